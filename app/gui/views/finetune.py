"""Fine-tune: pick a folder of documents, preview the dataset report, set hyper-parameters,
start / cancel / resume a LoRA run, watch loss and validation loss live (pyqtgraph) with the
best checkpoint marked, then chat with the adapter; the adapters list loads or deletes one.

The run is `engine.train.trainer.train(config, cancel=threading.Event)` iterated on a task
thread; each `TrainEvent` comes back to the GUI as plain data. Without `engine.train` the view
says so. Knows nothing about how training works.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.gui.workers import plain, run_task

HYPER = {  # TrainConfig field: (label, default, lo, hi, decimals or None for ints)
    "epochs": ("Epochs", 2.0, 0.1, 100.0, 1),
    "lr": ("Learning rate", 2e-4, 1e-6, 1e-1, 6),
    "rank": ("LoRA rank", 8, 1, 256, None),
    "batch_size": ("Batch size", 4, 1, 256, None),
    "max_seq_len": ("Max sequence length", 512, 16, 32768, None),
    "val_fraction": ("Validation fraction", 0.1, 0.0, 0.5, 2),
    "eval_every": ("Validate every (steps)", 25, 1, 100000, None),
}


def _trainer() -> Any | None:
    try:
        from engine.train import trainer

        return trainer
    except Exception:  # noqa: BLE001 - not landed yet
        return None


def build_config(trainer: Any, values: dict) -> Any:
    """A `TrainConfig` from the form (keys it does not declare are dropped)."""
    cls = trainer.TrainConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in fields})


class LossPlot(QWidget):
    """Training loss as a line, validation loss as points, the best checkpoint as a star."""

    def __init__(self) -> None:
        super().__init__()
        import pyqtgraph as pg

        pg.setConfigOptions(antialias=True)
        self.pg = pg
        self.plot = pg.PlotWidget(background=None)
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "loss")
        self.plot.addLegend(offset=(-10, 10))
        self.train = self.plot.plot([], [], pen=pg.mkPen("#2f6fde", width=2), name="train")
        self.val = self.plot.plot(
            [],
            [],
            pen=pg.mkPen("#e07b00", width=2),
            symbol="o",
            symbolSize=7,
            symbolBrush="#e07b00",
            name="validation",
        )
        self.best = self.plot.plot(
            [],
            [],
            pen=None,
            symbol="star",
            symbolSize=16,
            symbolBrush="#1e9e4a",
            name="best checkpoint",
        )
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.plot)
        self.clear()

    def clear(self) -> None:
        self.points: dict[str, list] = {"train": [], "val": [], "best": []}
        self._redraw()

    def add(self, step: int, loss: float | None, val_loss: float | None, best: bool) -> None:
        if loss is not None:
            self.points["train"].append((step, loss))
        if val_loss is not None:
            self.points["val"].append((step, val_loss))
            if best:
                self.points["best"] = [(step, val_loss)]
        self._redraw()

    def _redraw(self) -> None:
        for key, item in (("train", self.train), ("val", self.val), ("best", self.best)):
            pts = self.points[key]
            item.setData([p[0] for p in pts], [p[1] for p in pts])


class FinetuneView(QWidget):
    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        self.trainer = _trainer()
        self.task = None
        self.run_dir: Path | None = None
        self.run_name = ""
        self.events: list[dict] = []
        self.finished_kind: str | None = None
        self.fuse_task = None
        self.fused_path: str | None = None
        self.best_checkpoint: str | None = None
        self.folder = QLineEdit(placeholderText="A folder of .txt, .md, .pdf, .html, .docx, .jsonl")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        frow = QHBoxLayout()
        frow.addWidget(self.folder, 1)
        frow.addWidget(browse)
        form = QFormLayout()
        form.addRow("Documents", frow)
        self.hyper: dict[str, Any] = {}
        for key, (label, default, lo, hi, dec) in HYPER.items():
            w = QSpinBox() if dec is None else QDoubleSpinBox()
            if dec is not None:
                w.setDecimals(dec)
                w.setSingleStep(10**-dec * (10 if dec > 2 else 5))
            w.setRange(lo, hi)
            w.setValue(default)
            self.hyper[key] = w
            form.addRow(label, w)
        self.preview_btn = QPushButton("Preview data")
        self.preview_btn.clicked.connect(self.preview)
        self.start_btn = QPushButton("Start")
        self.start_btn.clicked.connect(lambda: self.start(resume=False))
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.clicked.connect(lambda: self.start(resume=True))
        self.chat_btn = QPushButton("Chat with this adapter")
        self.chat_btn.clicked.connect(self.chat_with_adapter)
        brow = QHBoxLayout()
        for b in (self.preview_btn, self.start_btn, self.cancel_btn, self.resume_btn):
            brow.addWidget(b)
        self.report = QPlainTextEdit(readOnly=True)
        self.report.setPlaceholderText(
            "The dataset report shows here: files, documents, tokens, chunks."
        )
        self.adapters = QListWidget()
        arow = QHBoxLayout()
        for text, fn in (
            ("Use in chat", self._use_adapter),
            ("Fuse into a model", self.fuse_adapter),
            ("Delete", self._delete_adapter),
        ):
            b = QPushButton(text)
            b.clicked.connect(fn)
            arow.addWidget(b)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(_heading("Fine-tune the loaded model (LoRA)"))
        ll.addLayout(form)
        ll.addLayout(brow)
        ll.addWidget(self.report, 1)
        ll.addWidget(_heading("Adapters"))
        ll.addWidget(self.adapters)
        ll.addLayout(arow)
        try:
            self.plot: Any = LossPlot()
        except Exception as e:  # noqa: BLE001 - pyqtgraph missing: the numbers still show
            self.plot = QLabel(f"plot unavailable: {e}")
        self.progress = QLabel("No run yet.")
        self.progress.setWordWrap(True)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(_heading("Loss"))
        rl.addWidget(self.plot, 1)
        rl.addWidget(self.progress)
        rl.addWidget(self.chat_btn, 0, Qt.AlignRight)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([420, 640])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(split)
        if self.trainer is None:
            self.progress.setText(
                "Training is not available yet (engine.train.trainer has not "
                "landed); the data preview works."
            )
        self._update_buttons()
        self.refresh_adapters()

    def activated(self) -> None:
        self.refresh_adapters()

    # ---- data ----------------------------------------------------------------------------
    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of documents")
        if d:
            self.folder.setText(d)

    def _model_path(self) -> str | None:
        info = self.window.client.info or {}
        return str(info["path"]) if info.get("path") else None

    def values(self) -> dict:
        v = {k: w.value() for k, w in self.hyper.items()}
        v.update(model=self._model_path(), data=self.folder.text().strip())
        return v

    def preview(self) -> None:
        model, folder = self._model_path(), self.folder.text().strip()
        if not model or not folder:
            self.window.banner.show_message("Load a model and pick a folder first.", "info")
            return
        v = self.values()

        def work(_task: Any) -> str:
            from engine.tokenizer import Tokenizer
            from engine.train.data import build_dataset

            tok = Tokenizer.from_path(model)
            _ds, report = build_dataset(
                folder, tok, int(v["max_seq_len"]), val_fraction=float(v["val_fraction"])
            )
            return report.summary()

        self.report.setPlainText("Reading the folder…")
        run_task(work, on_done=self.report.setPlainText, on_failed=self._failed)

    # ---- training ------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        if self.trainer is None or self.task is not None:
            return
        v = self.values()
        if not v["model"] or not v["data"]:
            self.window.banner.show_message("Load a model and pick a folder first.", "info")
            return
        from engine.paths import adapters_dir, runs_dir

        if not resume or self.run_dir is None:
            self.run_name = f"{Path(v['model']).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.run_dir = runs_dir() / self.run_name
        v["out"] = str(adapters_dir() / self.run_name)
        v["run_dir"] = str(self.run_dir)
        v["save_every"] = v["eval_every"]
        v["resume"] = str(self.run_dir) if resume else None
        try:
            config = build_config(self.trainer, v)
        except Exception as e:  # noqa: BLE001
            from app.gui.workers import error_text

            self._failed(error_text(e))
            return
        if not resume and hasattr(self.plot, "clear"):
            self.plot.clear()
        self.best_checkpoint = None
        self.events = []
        self.progress.setText("Loading the model and reading the documents…")
        trainer = self.trainer

        self.task = run_task(
            lambda task: trainer.train(config, cancel=task.cancel_event),
            iterate=True,
            drain=True,  # the trainer sees the flag itself and saves a checkpoint
            on_item=self._on_event,
            on_done=self._on_done,
            on_failed=self._failed,
        )
        self._update_buttons()

    def _on_event(self, ev: Any) -> None:
        e = plain(ev)
        kind = e.get("kind", "step")
        step = int(e.get("step") or 0)
        self.events.append(e)
        if kind == "data":
            self.report.setPlainText(e.get("message", ""))
            return
        if kind == "eval" and e.get("is_best") and self.run_dir is not None:
            self.best_checkpoint = str(self.run_dir / "best")
        if kind == "done" and e.get("checkpoint"):
            self.best_checkpoint = str(e["checkpoint"])  # the best adapter, copied to `out`
        if hasattr(self.plot, "add") and kind in ("step", "eval"):
            loss = e.get("loss") if kind == "step" else None
            val = e.get("val_loss") if kind == "eval" else None
            self.plot.add(step, loss, val, bool(e.get("is_best")))
        if kind not in ("step", "eval", "done"):
            if e.get("message"):
                self.progress.setText(e["message"])
            return
        total = e.get("total_steps") or 0
        bits = [f"step {step}/{total}" if total else f"step {step}"]
        if e.get("epoch"):
            bits.append(f"epoch {float(e['epoch']):.2f}")
        if e.get("loss") is not None:
            bits.append(f"loss {e['loss']:.3f}")
        if e.get("val_loss") is not None:
            bits.append(f"val {e['val_loss']:.3f}")
        if e.get("tokens_per_s"):
            bits.append(f"{e['tokens_per_s']:.0f} tok/s")
        if e.get("eta_s"):
            bits.append(f"ETA {int(e['eta_s']) // 60}:{int(e['eta_s']) % 60:02d}")
        if e.get("peak_memory"):
            bits.append(f"peak {e['peak_memory'] / 1e6:,.0f} MB")
        if self.best_checkpoint:
            bits.append("best checkpoint ★")
        self.progress.setText("  ·  ".join(bits))

    def _on_done(self, last: Any) -> None:
        kind = plain(last).get("kind") if last is not None else None
        self.task = None
        self.finished_kind = kind
        note = {
            "cancelled": "cancelled: Resume goes on from the last checkpoint",
            "done": "done",
            "stopped": "stopped early (no improvement)",
        }.get(kind, "ended")
        self.progress.setText(self.progress.text() + f"  ·  {note}")
        self._update_buttons()
        self.refresh_adapters()

    def _failed(self, message: str) -> None:
        self.task = None
        self._update_buttons()
        self.window.show_error(message)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def chat_with_adapter(self) -> None:
        path = self.best_checkpoint
        if path and self.window.client.info is not None:
            self.window.client.set_adapter(path)
            self.window.show_view("chat")

    def _update_buttons(self) -> None:
        running = self.task is not None
        ok = self.trainer is not None
        self.start_btn.setEnabled(ok and not running)
        self.resume_btn.setEnabled(ok and not running and self.run_dir is not None)
        self.cancel_btn.setEnabled(running)
        self.chat_btn.setEnabled(not running and self.best_checkpoint is not None)

    # ---- adapters ------------------------------------------------------------------------
    def refresh_adapters(self) -> None:
        from engine.paths import adapters_dir

        self.adapters.clear()
        for d in sorted((p for p in adapters_dir().iterdir() if p.is_dir()), reverse=True):
            self.adapters.addItem(d.name)
            self.adapters.item(self.adapters.count() - 1).setData(Qt.UserRole, str(d))

    def _selected_adapter(self) -> str | None:
        item = self.adapters.currentItem()
        return item.data(Qt.UserRole) if item else None

    def _use_adapter(self) -> None:
        path = self._selected_adapter()
        if path and self.window.client.info is not None:
            self.window.client.set_adapter(path)
            self.window.show_view("chat")

    def _delete_adapter(self) -> None:
        path = self._selected_adapter()
        if not path or self.task is not None:
            return
        from PySide6.QtWidgets import QMessageBox

        in_use = (self.window.client.info or {}).get("adapter") == path
        answer = QMessageBox.question(
            self,
            "Delete adapter",
            f"Delete the adapter {Path(path).name} and its files?"
            + (
                "\nIt is applied to the loaded model now and stays so until you unload it."
                if in_use
                else ""
            ),
            QMessageBox.Yes | QMessageBox.No,
            QMessageBox.No,
        )
        if answer == QMessageBox.Yes:
            shutil.rmtree(path, ignore_errors=True)
            self.refresh_adapters()
            self.window.refresh_models()

    def fuse_adapter(self) -> None:
        """Write base model + adapter as a standalone model folder in the models folder."""
        path = self._selected_adapter()
        if not path:
            return
        from engine.paths import models_dir

        out = models_dir() / f"{Path(path).name}-fused"
        fallback = self._model_path()

        def work(_task: Any) -> str:
            import engine
            from engine.train import lora as L

            base = L.read_adapter_config(path).get("base_model") or fallback
            if not base:
                raise ValueError(f"{path}: the adapter names no base model; load it first")
            loaded = engine.load(base)
            L.load_adapter(loaded.model, path)
            return str(L.export(loaded.model, base, out))

        self.progress.setText(f"Fusing {Path(path).name}…")
        self.fuse_task = run_task(work, on_done=self._fused, on_failed=self._failed)

    def _fused(self, out: str) -> None:
        self.fuse_task = None
        self.fused_path = out
        self.progress.setText(f"Fused model saved to {out}")
        self.window.refresh_models()

    def shutdown(self) -> None:
        self.cancel()


def _heading(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setStyleSheet("font-size: 15px; font-weight: 600;")
    return lab


def make_view(window: Any) -> QWidget:
    return FinetuneView(window)

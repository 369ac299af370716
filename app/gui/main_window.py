"""The main window: a navigation rail, the views, a model toolbar and a non-modal banner.

It wires the views to one `EngineClient` and one `Store`; views that need an engine part that
has not landed show "not available yet" instead of failing. Knows nothing about model code.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QPushButton,
    QStackedWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from app.gui.memory import mlx_active, process_rss
from app.gui.models.library import discover_local_models, human_bytes
from app.gui.serving import ServerController, is_loopback
from app.gui.views.chat import ChatView
from app.gui.views.welcome import WelcomePanel, default_fetcher
from app.gui.widgets.banner import Banner
from app.gui.widgets.elided import ElidedLabel
from app.gui.workers import EngineClient, default_engine_factory, wait_all_tasks
from app.store import Store

VIEWS = [
    ("chat", "Chat", "✉"),
    ("library", "Library", "☷"),
    ("downloads", "Downloads", "⬇"),
    ("finetune", "Fine-tune", "⚒"),
    ("inspector", "Inspector", "⌕"),
    ("settings", "Settings", "⚙"),
]


def unavailable(what: str, detail: str = "") -> QWidget:
    """The placeholder shown for a part of the engine that has not landed."""
    w = QWidget()
    lay = QVBoxLayout(w)
    lab = QLabel(
        f"<h2>{what}</h2><p>This part is not available yet.</p><p style='color:gray'>{detail}</p>"
    )
    lab.setAlignment(Qt.AlignCenter)
    lab.setWordWrap(True)
    lay.addWidget(lab)
    return w


class MainWindow(QMainWindow):
    def __init__(
        self,
        store: Store | None = None,
        engine_factory=default_engine_factory,
        fetcher=default_fetcher,
        autoload: bool = True,
    ) -> None:
        super().__init__()
        self.setWindowTitle("Latent Studio")
        self.resize(1280, 800)
        self.store = store or Store()
        self.client = EngineClient(engine_factory, self)
        self.banner = Banner()
        self.client.load_failed.connect(self._on_load_failed)
        self.client.loaded.connect(self._on_loaded)
        self.client.unloaded.connect(self._on_unloaded)

        self.chat = ChatView(self.store, self.client)
        self.chat.error.connect(self.show_error)
        self.welcome = WelcomePanel(fetcher)
        self.welcome.ready.connect(self._on_default_ready)
        self.welcome.failed.connect(self.show_error)

        self.stack = QStackedWidget()
        self.views: dict[str, QWidget] = {"chat": self.chat}
        self.nav = QListWidget()
        self.nav.setFixedWidth(104)
        self.nav.setIconSize(QSize(24, 24))
        self.nav.setSpacing(4)
        self.nav.setStyleSheet(
            "QListWidget { border: none; font-size: 12px; background: palette(window); }"
            " QListWidget::item { padding: 10px 4px; border-radius: 6px; }"
            " QListWidget::item:selected { background: palette(highlight);"
            " color: palette(highlighted-text); }"
        )
        for key, label, glyph in VIEWS:
            view = self.chat if key == "chat" else self._make_view(key, label)
            self.views[key] = view
            self.stack.addWidget(view)
            item = QListWidgetItem(f"{glyph}\n{label}")
            item.setTextAlignment(Qt.AlignCenter)
            item.setData(Qt.UserRole, key)
            self.nav.addItem(item)
        self.nav.currentRowChanged.connect(self._on_nav)

        central = QWidget()
        outer = QVBoxLayout(central)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        from PySide6.QtWidgets import QHBoxLayout

        body = QHBoxLayout()
        body.setContentsMargins(0, 0, 0, 0)
        body.addWidget(self.nav)
        right = QVBoxLayout()
        right.setContentsMargins(6, 6, 6, 0)
        right.addWidget(self.banner)
        right.addWidget(self.stack, 1)
        body.addLayout(right, 1)
        outer.addLayout(body, 1)
        self.setCentralWidget(central)
        self._build_toolbar()
        from app.gui.about import install_about  # Help > About (packaging's part)

        install_about(self)
        self.status = QLabel("No model loaded")
        self.statusBar().addPermanentWidget(self.status)
        QShortcut(QKeySequence("Ctrl+N"), self).activated.connect(self.new_chat)
        QShortcut(QKeySequence("Ctrl+F"), self).activated.connect(self._find_chat)
        QShortcut(QKeySequence("Ctrl+Shift+R"), self).activated.connect(self.chat.regenerate)
        self.nav.setCurrentRow(0)
        if autoload:
            self.start()

    # ---- views ---------------------------------------------------------------------------
    def _make_view(self, key: str, label: str) -> QWidget:
        try:
            module = importlib.import_module(f"app.gui.views.{key}")
            return module.make_view(self)
        except ModuleNotFoundError as e:
            return unavailable(label, f"{e}")
        except Exception as e:  # noqa: BLE001 - a view that cannot start must not stop the app
            traceback.print_exc()
            return unavailable(label, f"{type(e).__name__}: {e}")

    def show_view(self, key: str) -> None:
        self.nav.setCurrentRow([k for k, _, _ in VIEWS].index(key))

    def _on_nav(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        view = self.stack.currentWidget()
        if hasattr(view, "activated"):
            view.activated()

    def new_chat(self) -> None:
        self.show_view("chat")
        self.chat.new_conversation()

    def _find_chat(self) -> None:
        self.show_view("chat")
        self.chat.search.setFocus()
        self.chat.search.selectAll()

    def show_error(self, message: str) -> None:
        self.banner.show_message(message, "error")

    # ---- model toolbar -------------------------------------------------------------------
    def _build_toolbar(self) -> None:
        bar = QToolBar("Model")
        bar.setMovable(False)
        bar.setIconSize(QSize(16, 16))
        self.addToolBar(bar)
        self.model_combo = QComboBox()
        self.model_combo.setMinimumWidth(240)
        self.model_combo.setMaximumWidth(360)
        self.model_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(24)
        self.model_combo.setToolTip("Models on this computer")
        self.model_combo.setPlaceholderText("No models yet: see Library")
        bar.addWidget(self.model_combo)
        self.load_btn = QPushButton("Load")
        self.load_btn.clicked.connect(self.load_selected)
        self.unload_btn = QPushButton("Unload")
        self.unload_btn.clicked.connect(self.client.unload)
        open_btn = QPushButton("Open file…")
        open_btn.clicked.connect(self._open_file)
        for w in (self.load_btn, self.unload_btn, open_btn):
            bar.addWidget(w)
        bar.addSeparator()
        self.model_label = ElidedLabel("", min_width=120)
        self.model_label.setStyleSheet("color: palette(mid);")
        bar.addWidget(self.model_label)
        self.mem_label = QLabel("")
        self.mem_label.setStyleSheet("padding: 0 8px;")
        bar.addWidget(self.mem_label)
        self.mem_timer = QTimer(self)
        self.mem_timer.setInterval(2000)
        self.mem_timer.timeout.connect(self.refresh_memory)
        self.mem_timer.start()
        self.mem_rss: int | None = None
        self.mem_mlx: int | None = None
        self.adapter_check = QCheckBox("Adapter")
        self.adapter_check.setToolTip("Apply a LoRA adapter to the loaded model")
        self.adapter_combo = QComboBox()
        self.adapter_combo.setMinimumWidth(140)
        self.adapter_combo.setMaximumWidth(200)
        self.adapter_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.adapter_combo.setMinimumContentsLength(14)
        self.adapter_check.toggled.connect(self._apply_adapter)
        self.adapter_combo.activated.connect(lambda *_: self._apply_adapter())
        self._adapter_actions = [
            bar.addWidget(self.adapter_check),
            bar.addWidget(self.adapter_combo),
        ]
        bar.addSeparator()
        self.serve_btn = QPushButton("Serve")
        self.serve_btn.setCheckable(True)
        self.serve_btn.setToolTip(
            "Serve this model over an OpenAI-compatible API (port and key in Settings)"
        )
        self.serve_btn.toggled.connect(self._toggle_serve)
        self.serve_label = QLabel("")
        self.serve_label.setTextFormat(Qt.PlainText)
        self.serve_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.serve_label.setStyleSheet("padding: 0 6px;")
        bar.addWidget(self.serve_btn)
        bar.addWidget(self.serve_label)
        self.server = ServerController(self.client, self)
        self.server.state_changed.connect(self._on_serve_state)
        self.server.failed.connect(self.show_error)
        self._serve_restart = False
        self.client.busy_changed.connect(self._update_toolbar)
        self.refresh_models()
        self._update_toolbar()
        self.refresh_memory()

    def refresh_models(self) -> None:
        current = self.model_combo.currentData()
        self.model_combo.clear()
        paths = []
        for m in discover_local_models(self.store.setting("extra_model_dirs", [])):
            p = str(getattr(m, "path", ""))
            if p and p not in paths:
                paths.append(p)
                name = getattr(m, "name", None) or Path(p).name
                self.model_combo.addItem(
                    f"{name}  ·  {human_bytes(getattr(m, 'size_bytes', 0))}", p
                )
        for p in self.store.setting("recent_models", []):
            if p not in paths and Path(p).exists():
                paths.append(p)
                self.model_combo.addItem(Path(p).name, p)
        if current:
            i = self.model_combo.findData(current)
            if i >= 0:
                self.model_combo.setCurrentIndex(i)
        self.adapter_combo.clear()
        try:
            from engine.paths import adapters_dir

            for d in sorted(p for p in adapters_dir().iterdir() if p.is_dir()):
                self.adapter_combo.addItem(d.name, str(d))
        except Exception:  # noqa: BLE001
            pass
        self._update_toolbar()

    def load_model(self, path: str, adapter: str | None = None) -> None:
        self.banner.hide()
        self.status.setText(f"Loading {Path(path).name}…")
        self.client.load(path, adapter)

    def load_selected(self) -> None:
        path = self.model_combo.currentData()
        if path:
            self.load_model(path)

    def _open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model", str(Path.home()), "Models (*.gguf config.json);;All files (*)"
        )
        if path:
            if path.endswith("config.json"):
                path = str(Path(path).parent)
            recent = [p for p in self.store.setting("recent_models", []) if p != path]
            self.store.set_setting("recent_models", [path, *recent][:10])
            self.refresh_models()
            self.load_model(path)

    def _apply_adapter(self, *_: Any) -> None:
        if self.client.info is None:
            return
        path = self.adapter_combo.currentData() if self.adapter_check.isChecked() else None
        if (self.client.info.get("adapter") or None) != path:
            self.status.setText("Applying adapter…" if path else "Removing adapter…")
            self.client.set_adapter(path)

    def _update_toolbar(self, *_: Any) -> None:
        busy = self.client.busy
        self.load_btn.setEnabled(not busy and self.model_combo.count() > 0)
        self.unload_btn.setEnabled(not busy and self.client.info is not None)
        self.model_combo.setEnabled(not busy)
        has_adapters = self.adapter_combo.count() > 0
        for action in getattr(self, "_adapter_actions", []):
            action.setVisible(has_adapters)
        self.adapter_check.setEnabled(not busy and self.client.info is not None and has_adapters)
        self.adapter_combo.setEnabled(not busy and has_adapters)
        if hasattr(self, "serve_btn"):
            self.serve_btn.setEnabled(self.client.info is not None or self.serve_btn.isChecked())

    def _serve_text(self) -> None:
        """The API's URL and what it has done (refreshed with the memory figures)."""
        if not self.server.running:
            return
        key = " (key required)" if self.serve_settings()[2] else ""
        served, busy = self.server.proxy.activity() if self.server.proxy else (0, 0)
        bits = [f"{self.server.url}{key}"]
        if served or busy:
            bits.append(f"{served} served" + (f", {busy} in progress" if busy else ""))
        self.serve_label.setText("  ·  ".join(bits))

    def refresh_memory(self) -> None:
        """The live memory figures and the API's activity (a timer calls this every 2 s)."""
        self._serve_text()
        rss, current = process_rss()
        self.mem_rss, self.mem_mlx = rss, mlx_active()
        bits = []
        weights = (self.client.info or {}).get("weight_bytes")
        if weights:
            bits.append(f"weights {human_bytes(weights)}")
        if rss:
            bits.append(f"{'memory' if current else 'peak memory'} {human_bytes(rss)}")
        self.mem_label.setText("  ·  ".join(bits))
        tip = [
            f"Model weights as stored: {human_bytes(weights) or 'no model loaded'}",
            f"App memory now ({'resident' if current else 'peak'}): {human_bytes(rss) or '?'}",
        ]
        if self.mem_mlx is not None:
            tip.append(f"MLX arrays now: {human_bytes(self.mem_mlx) or '0 B'}")
        self.mem_label.setToolTip("\n".join(tip + ["Refreshed every 2 seconds."]))

    # ---- "Serve this model" --------------------------------------------------------------
    def serve_settings(self) -> tuple[str, int, str]:
        """(host, port, api key) from the settings table."""
        host = str(self.store.setting("serve_host", "127.0.0.1") or "127.0.0.1")
        return (
            host,
            int(self.store.setting("serve_port", 8080)),
            str(self.store.setting("serve_api_key", "") or ""),
        )

    def set_serving(self, on: bool) -> None:
        self.serve_btn.setChecked(on)

    def _toggle_serve(self, on: bool) -> None:
        if not on:
            self._serve_restart = False
            self.serve_label.setText("Stopping…" if self.server.active else "")
            self.server.stop()
            return
        if self.client.info is None:
            self.serve_btn.setChecked(False)
            self.show_error("load a model before serving it")
            return
        if self.server.active:
            return
        host, port, key = self.serve_settings()
        if not is_loopback(host):
            self.banner.show_message(
                f"The API listens on {host}:{port}: other computers on your network can use "
                "this model" + ("." if key else ", and no API key is set (Settings)."),
                "warning",
            )
        self.serve_label.setText("Starting…")
        self.server.start(self._served_name(), host, port, key or None)

    def _served_name(self) -> str:
        info = self.client.info or {}
        return str(info.get("name") or Path(str(info.get("path") or "model")).name)

    def _on_serve_state(self, running: bool, url: str) -> None:
        if running:
            self._serve_text()
            self.serve_label.setToolTip(f"OpenAI-compatible API for {self.server.model_name}")
            self.serve_btn.setText("Serving")
            return
        self.serve_btn.setText("Serve")
        self.serve_label.setText("")
        if self._serve_restart and self.client.info is not None:
            self._serve_restart = False
            self._toggle_serve(True)
            return
        self.serve_btn.blockSignals(True)
        self.serve_btn.setChecked(False)
        self.serve_btn.blockSignals(False)
        self._update_toolbar()

    # ---- engine events -------------------------------------------------------------------
    def start(self) -> None:
        """Load the last model, else a local one, else show the first-run welcome panel."""
        last = self.store.setting("last_model")
        if last and Path(last).exists():
            self.load_model(last)
            return
        models = [self.model_combo.itemData(i) for i in range(self.model_combo.count())]
        if models:
            preferred = [p for p in models if "smollm2" in p.lower()] or models
            self.model_combo.setCurrentIndex(self.model_combo.findData(preferred[0]))
            self.load_model(preferred[0])
        else:
            self.chat.set_welcome(self.welcome)

    def _on_default_ready(self, path: str) -> None:
        self.refresh_models()
        self.load_model(path)

    def _on_loaded(self, info: dict) -> None:
        self.chat.set_welcome(None)
        path = str(info.get("path") or "")
        if path:
            self.store.set_setting("last_model", path)
            i = self.model_combo.findData(path)
            if i < 0:
                self.model_combo.addItem(Path(path).name, path)
                i = self.model_combo.count() - 1
            self.model_combo.setCurrentIndex(i)
        params = info.get("n_params") or 0
        bits = [str(info.get("name") or Path(path).name)]
        if params:
            bits.append(
                f"{params / 1e9:.1f}B params"
                if params >= 1e9
                else f"{params / 1e6:,.0f}M params"
                if params >= 1e6
                else f"{params / 1e3:,.0f}K params"
            )
        if info.get("quantization"):
            bits.append(str(info["quantization"]))
        if info.get("adapter"):
            bits.append(f"adapter {Path(str(info['adapter'])).name}")
        self.model_label.setText("  ·  ".join(bits))
        self.model_label.setToolTip(f"{self.model_label.text()}\n{path}")
        self.refresh_memory()
        self.status.setText("Ready")
        if self.server.active and self.server.model_name != self._served_name():
            self._serve_restart = True  # serve the new model under its own name
            self.server.stop()
        self.adapter_check.blockSignals(True)
        self.adapter_check.setChecked(bool(info.get("adapter")))
        self.adapter_check.blockSignals(False)
        self._update_toolbar()

    def _on_unloaded(self) -> None:
        if self.server.active:
            self.set_serving(False)
        self.model_label.setText("")
        self.refresh_memory()
        self.status.setText("No model loaded")
        self._update_toolbar()

    def _on_load_failed(self, message: str) -> None:
        self.status.setText("Model not loaded")
        self.show_error(message)
        self._update_toolbar()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        self.mem_timer.stop()
        for view in self.views.values():
            if hasattr(view, "shutdown"):
                view.shutdown()
        self.server.wait_stopped()
        self.client.shutdown()
        wait_all_tasks()

"""The library: search the Hub (filters), see a repo's variants with a fit label, queue a
download; and the models on this computer (load, delete, import).

Every Hub call runs on a task thread. Without `engine.hub` the view says so and still lists
model files found in the models folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.gui.models.library import (
    LocalModelsModel,
    SearchResultsModel,
    VariantsModel,
    discover_local_models,
    human_bytes,
)
from app.gui.workers import run_task


def _hub() -> Any | None:
    try:
        import engine.hub as hub

        return hub
    except Exception:  # noqa: BLE001 - not landed yet
        return None


def _table(model) -> QTableView:
    t = QTableView()
    t.setModel(model)
    t.setSelectionBehavior(QAbstractItemView.SelectRows)
    t.setSelectionMode(QAbstractItemView.SingleSelection)
    t.verticalHeader().hide()
    t.setAlternatingRowColors(True)
    t.setShowGrid(False)
    t.setWordWrap(False)
    t.setTextElideMode(Qt.ElideMiddle)
    header = t.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeToContents)
    header.setSectionResizeMode(0, QHeaderView.Stretch)
    return t


def _heading(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setStyleSheet("font-size: 15px; font-weight: 600; margin-top: 4px;")
    return lab


class LibraryView(QWidget):
    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        self.hub = _hub()
        self.query = QLineEdit(placeholderText="Search the Hugging Face Hub, e.g. SmolLM2")
        self.query.returnPressed.connect(self.search)
        self.format = QComboBox()
        self.format.addItems(["any format", "gguf", "mlx", "safetensors"])
        self.sort = QComboBox()
        self.sort.addItems(["downloads", "likes", "updated"])
        self.max_params = QSpinBox()
        self.max_params.setRange(0, 1000)
        self.max_params.setSpecialValueText("any size")
        self.max_params.setSuffix(" B params max")
        self.search_btn = QPushButton("Search")
        self.search_btn.clicked.connect(self.search)
        top = QHBoxLayout()
        top.addWidget(self.query, 1)
        for w in (self.format, self.sort, self.max_params, self.search_btn):
            top.addWidget(w)

        self.results = SearchResultsModel(self)
        self.results_view = _table(self.results)
        self.results_view.selectionModel().currentRowChanged.connect(self._on_result)
        self.variants = VariantsModel(self)
        self.variants_view = _table(self.variants)
        self.download_btn = QPushButton("Download variant")
        self.download_btn.clicked.connect(self.download_selected)
        self.variant_note = QLabel("Pick a model to see its variants and whether they fit.")
        self.variant_note.setWordWrap(True)
        vbox = QWidget()
        vl = QVBoxLayout(vbox)
        vl.setContentsMargins(0, 0, 0, 0)
        vl.addWidget(_heading("Variants"))
        vl.addWidget(self.variant_note)
        vl.addWidget(self.variants_view, 1)
        vl.addWidget(self.download_btn, 0, Qt.AlignRight)
        hub_split = QSplitter()
        hub_split.addWidget(self.results_view)
        hub_split.addWidget(vbox)
        hub_split.setSizes([600, 500])

        self.local = LocalModelsModel(self)
        self.local_view = _table(self.local)
        self.local_view.doubleClicked.connect(lambda *_: self.load_selected())
        row = QHBoxLayout()
        for text, fn in (
            ("Load", self.load_selected),
            ("Delete…", self.delete_selected),
            ("Import…", self.import_model),
            ("Refresh", self.refresh_local),
        ):
            b = QPushButton(text)
            b.clicked.connect(fn)
            row.addWidget(b)
        row.addStretch(1)
        self.status = QLabel("")
        row.addWidget(self.status)
        lower = QWidget()
        ll = QVBoxLayout(lower)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(_heading("On this computer"))
        ll.addWidget(self.local_view, 1)
        ll.addLayout(row)

        upper = QWidget()
        ul = QVBoxLayout(upper)
        ul.setContentsMargins(0, 0, 0, 0)
        ul.addWidget(_heading("Find models"))
        ul.addLayout(top)
        ul.addWidget(hub_split, 1)
        if self.hub is None:
            upper.setEnabled(False)
            self.variant_note.setText("Hub search is not available yet.")
        split = QSplitter(Qt.Vertical)
        split.addWidget(upper)
        split.addWidget(lower)
        split.setSizes([450, 300])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(split)
        self.refresh_local()

    def activated(self) -> None:
        self.refresh_local()

    # ---- Hub -----------------------------------------------------------------------------
    def search(self) -> None:
        if self.hub is None:
            return
        fmt = self.format.currentText()
        kwargs = dict(
            formats=None if fmt == "any format" else [fmt],
            sort=self.sort.currentText(),
            limit=50,
            max_params=self.max_params.value() * 10**9 or None,
        )
        query = self.query.text().strip()
        self.status.setText("Searching…")
        self.search_btn.setEnabled(False)
        run_task(
            lambda _t: self.hub.search_models(query, **kwargs),
            on_done=self._on_results,
            on_failed=self._on_failed,
        )

    def _on_results(self, rows: list) -> None:
        self.search_btn.setEnabled(True)
        self.results.set_rows(rows)
        self.status.setText(f"{len(rows)} models found")
        self.variants.set_rows([])

    def _on_failed(self, message: str) -> None:
        self.search_btn.setEnabled(True)
        self.status.setText("")
        self.window.show_error(message)

    def _on_result(self, current, _previous=None) -> None:
        if not current.isValid():
            return
        repo = self.results.rows[current.row()].repo_id
        self.variant_note.setText(f"Reading {repo}…")
        self.variants.set_rows([])
        run_task(
            lambda _t: self.hub.list_variants(repo),
            on_done=self._on_variants,
            on_failed=self._on_failed,
        )

    def _on_variants(self, rows: list) -> None:
        self.variants.set_rows(rows)
        self.variant_note.setText(
            "Memory needed = weights + a 4,096-token KV cache + overhead, against this "
            "machine's memory."
            if rows
            else "No loadable variant in this repository."
        )

    def selected_repo(self) -> str | None:
        ix = self.results_view.currentIndex()
        return self.results.rows[ix.row()].repo_id if ix.isValid() else None

    def download_selected(self) -> None:
        repo = self.selected_repo()
        ix = self.variants_view.currentIndex()
        if repo is None or not ix.isValid():
            self.window.banner.show_message("Pick a model and one of its variants first.", "info")
            return
        variant = self.variants.rows[ix.row()]
        self.enqueue(repo, list(variant.files))

    def enqueue(self, repo: str, include: list[str] | None) -> str | None:
        downloads = self.window.views.get("downloads")
        if not hasattr(downloads, "manager") or downloads.manager is None:
            self.window.show_error("downloads are not available yet")
            return None
        job_id = downloads.manager.enqueue(repo, include=include)
        self.window.banner.show_message(f"Downloading {repo}: see Downloads.", "info")
        return job_id

    # ---- local ---------------------------------------------------------------------------
    def refresh_local(self) -> None:
        extra = self.window.store.setting("extra_model_dirs", [])
        run_task(
            lambda _t: discover_local_models(extra),
            on_done=self.local.set_rows,
            on_failed=self._on_failed,
        )

    def _selected_local(self) -> Any | None:
        ix = self.local_view.currentIndex()
        return self.local.rows[ix.row()] if ix.isValid() else None

    def load_selected(self) -> None:
        m = self._selected_local()
        if m is not None:
            self.window.load_model(str(m.path))
            self.window.show_view("chat")

    def delete_selected(self) -> None:
        m = self._selected_local()
        if m is None or self.hub is None:
            return
        size = human_bytes(getattr(m, "size_bytes", 0))
        what = "Forget" if getattr(m, "source", "") == "imported" else "Delete"
        question = f"{what} {m.name} ({size})?" + (
            "" if what == "Forget" else " Its files are removed from disk."
        )
        if QMessageBox.question(self, f"{what} model", question) == QMessageBox.Yes:
            self.delete_path(str(m.path))

    def delete_path(self, path: str) -> None:
        """Delete a model from disk (an imported one is only forgotten)."""
        run_task(
            lambda _t: self.hub.delete_model(path),
            on_done=self._on_deleted,
            on_failed=self._on_failed,
        )

    def _on_deleted(self, freed: int) -> None:
        self.status.setText(f"Freed {human_bytes(freed) or '0 B'}")
        self.refresh_local()
        self.window.refresh_models()

    def import_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Import a model", str(Path.home()), "Models (*.gguf config.json)"
        )
        if path and self.hub is not None:
            self.import_path(str(Path(path).parent) if path.endswith("config.json") else path)

    def import_path(self, path: str) -> None:
        """Reference a .gguf file or a model folder in place."""
        run_task(
            lambda _t: self.hub.import_model(path),
            on_done=lambda m: (
                self.status.setText(f"Imported {m.name}"),
                self.refresh_local(),
                self.window.refresh_models(),
            ),
            on_failed=self._on_failed,
        )


def make_view(window: Any) -> QWidget:
    return LibraryView(window)

"""Inspector: what the loaded model stores, one row per parameter (name, shape, dtype, bytes).

The table comes from the engine thread (`EngineClient.inspect`, `mlx.utils.tree_flatten` of
the model's parameters); this view only shows it. Attention maps and router captures come later.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QSortFilterProxyModel
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.gui.models.library import RecordTableModel, human_bytes


class ParameterTableModel(RecordTableModel):
    columns = [
        ("Parameter", lambda r: r[0]),
        ("Shape", lambda r: " × ".join(str(d) for d in r[1])),
        ("Dtype", lambda r: r[2]),
        ("Bytes", lambda r: human_bytes(r[3]) or "0 B"),
    ]


class InspectorView(QWidget):
    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        self.model = ParameterTableModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setFilterKeyColumn(0)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.verticalHeader().hide()
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.filter = QLineEdit(placeholderText="Filter parameters, e.g. layers.0.")
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        self.summary = QLabel("Load a model to see what it stores.")
        title = QLabel("Inspector")
        title.setStyleSheet("font-size: 15px; font-weight: 600;")
        top = QHBoxLayout()
        top.addWidget(self.filter, 1)
        top.addWidget(refresh)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(title)
        lay.addWidget(self.summary)
        lay.addLayout(top)
        lay.addWidget(self.table, 1)
        window.client.inspected.connect(self._on_rows)
        window.client.loaded.connect(lambda *_: self.refresh())
        window.client.unloaded.connect(lambda: self._on_rows([]))

    def activated(self) -> None:
        if not self.model.rows and self.window.client.info is not None:
            self.refresh()

    def refresh(self) -> None:
        self.window.client.inspect()

    def _on_rows(self, rows: list) -> None:
        self.model.set_rows(rows)
        info = self.window.client.info or {}
        if not rows:
            self.summary.setText("Load a model to see what it stores.")
            return
        total = sum(r[3] for r in rows)
        self.summary.setText(
            f"{info.get('name', 'model')}: {len(rows):,} tensors, {human_bytes(total)} as stored"
            + (f", {info['quantization']}" if info.get("quantization") else "")
        )


def make_view(window: Any) -> QWidget:
    return InspectorView(window)

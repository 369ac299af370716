"""Inspector: what the loaded model stores, one row per tensor (name, shape, storage format,
part, bytes), totals by part and the KV-cache cost per token.

The table comes from the engine thread (`EngineClient.inspect`: `engine.inspect.storage`, or
`mlx.utils.tree_flatten` of the parameters when that is missing); this view only shows it.
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
        ("Format", lambda r: r[2]),
        ("Part", lambda r: r[4] if len(r) > 4 else ""),
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
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.Stretch)
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

    def _on_rows(self, result: Any) -> None:
        rows = result.get("rows", []) if isinstance(result, dict) else list(result or [])
        summary = result.get("summary", {}) if isinstance(result, dict) else {}
        self.model.set_rows(rows)
        info = self.window.client.info or {}
        if not rows:
            self.summary.setText("Load a model to see what it stores.")
            return
        total = sum(r[3] for r in rows)
        lines = [
            f"<b>{info.get('name', 'model')}</b>: {len(rows):,} tensors, {human_bytes(total)} as "
            "stored" + (f", {info['quantization']}" if info.get("quantization") else "")
        ]
        parts = {k: v for k, v in (summary.get("totals") or {}).items() if v}
        if parts:
            lines.append(" · ".join(f"{k} {human_bytes(v)}" for k, v in parts.items()))
        if summary.get("kv_bytes_per_token"):
            kv, full = summary["kv_bytes_per_token"], summary.get("kv_bytes_per_token_full") or 0
            text = f"KV cache: {human_bytes(kv)} per token ({summary.get('kv_kind', '')})"
            if full and full != kv:
                text += f", vs {human_bytes(full)} with full per-head K and V ({full / kv:.1f}×)"
            lines.append(text)
        self.summary.setText("<br>".join(lines))


def make_view(window: Any) -> QWidget:
    return InspectorView(window)

"""Inspector: what the loaded model stores, one row per tensor (name, shape, storage format,
part, bytes), totals by part and the KV-cache cost per token.

The table comes from the engine thread (`EngineClient.inspect`: `engine.inspect.storage`, or
`mlx.utils.tree_flatten` of the parameters when that is missing); this view only shows it.
"Look at a prompt" runs `engine.inspect.look` there too: an attention map per layer and head
(axes labelled with the prompt's tokens), the next-token probabilities and, for MoE models, the
expert-routing grid. "Check the math" compares the engine with a float64 numpy forward
(app/gui/views/inspector_panels.py).
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QSortFilterProxyModel, Qt
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.gui.models.library import RecordTableModel, human_bytes
from app.gui.views.inspector_panels import MathPanel, RoutingGrid, token_label

MAX_TICKS = 32  # token labels per attention axis; longer prompts label every n-th token


class ParameterTableModel(RecordTableModel):
    columns = [
        ("Parameter", lambda r: r[0]),
        ("Shape", lambda r: " × ".join(str(d) for d in r[1])),
        ("Format", lambda r: r[2]),
        ("Part", lambda r: r[4] if len(r) > 4 else ""),
        ("Bytes", lambda r: human_bytes(r[3]) or "0 B"),
    ]


class TopNextModel(RecordTableModel):
    columns = [
        ("Next token", lambda r: repr(r[1])),
        ("Id", lambda r: r[0]),
        ("Probability", lambda r: f"{r[2]:.1%}"),
    ]


class LookPanel(QWidget):
    """One prompt through the model: attention map per layer and head, next-token odds."""

    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        self.result: dict = {}
        self.prompt = QLineEdit("The capital of France is")
        self.prompt.returnPressed.connect(self.run)
        self.button = QPushButton("Look")
        self.button.clicked.connect(self.run)
        self.layer = QSpinBox(prefix="layer ")
        self.head = QSpinBox(prefix="head ")
        self.layer.valueChanged.connect(self._draw)
        self.head.valueChanged.connect(self._draw)
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        for w in (self.button, self.layer, self.head):
            row.addWidget(w)
        self.note = QLabel("Attention probabilities: row = query token, column = key token.")
        self.note.setWordWrap(True)
        self.top = TopNextModel(self)
        top_view = QTableView()
        top_view.setModel(self.top)
        top_view.verticalHeader().hide()
        top_view.setShowGrid(False)
        top_view.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        top_view.setMaximumWidth(360)
        import pyqtgraph as pg

        self.plot = pg.PlotWidget(background=None)
        self.plot.setAspectLocked(True)
        self.plot.invertY(True)
        self.plot.setLabel("bottom", "key token (attended to)")
        self.plot.setLabel("left", "query token")
        self.image = pg.ImageItem()
        self.image.setColorMap(pg.colormap.get("viridis"))
        self.plot.addItem(self.image)
        top = QWidget()
        body = QHBoxLayout(top)
        body.setContentsMargins(0, 0, 0, 0)
        body.addWidget(self.plot, 1)
        body.addWidget(top_view)
        self.routing = RoutingGrid()
        self.routing.hide()
        split = QSplitter(Qt.Vertical)
        split.addWidget(top)
        split.addWidget(self.routing)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.note)
        lay.addWidget(split, 1)
        window.client.looked.connect(self._on_result)

    def run(self) -> None:
        if self.window.client.info is None or not self.prompt.text().strip():
            return
        self.button.setEnabled(False)
        self.note.setText("Running the prompt…")
        self.window.client.look(self.prompt.text())

    def _on_result(self, result: dict) -> None:
        self.button.setEnabled(True)
        if "error" in result:
            self.note.setText("")
            self.window.show_error(result["error"])
            return
        self.result = result
        att = result["attention"]
        self.layer.setRange(0, max(0, len(att) - 1))
        self.head.setRange(0, max(0, (att[0].shape[0] if att else 1) - 1))
        self.top.set_rows(result["top_next"])
        toks = " · ".join(repr(t) for t in result["tokens"])
        self.note.setText(f"{len(result['tokens'])} tokens: {toks}")
        self._label_axes(result["tokens"])
        self.routing.show_routes(
            result["tokens"], result.get("router") or {}, result.get("n_experts", 0)
        )
        self._draw()

    def _label_axes(self, tokens: list[str]) -> None:
        """Tick each row/column of the map with its token (pixel i spans [i, i + 1])."""
        step = max(1, -(-len(tokens) // MAX_TICKS))
        ticks = [(i + 0.5, token_label(t)) for i, t in enumerate(tokens) if i % step == 0]
        for side in ("bottom", "left"):
            self.plot.getAxis(side).setTicks([ticks, []])

    def _draw(self) -> None:
        att = self.result.get("attention") or []
        if not att:
            return
        a = att[min(self.layer.value(), len(att) - 1)]
        m = a[min(self.head.value(), a.shape[0] - 1)]  # (L queries, L keys)
        self.image.setImage(m.T, levels=(0.0, 1.0))  # ImageItem's first axis is x (keys)


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
        storage_page = QWidget()
        sl = QVBoxLayout(storage_page)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.addWidget(self.summary)
        sl.addLayout(top)
        sl.addWidget(self.table, 1)
        self.look_panel = LookPanel(window)
        tabs = QTabWidget()
        tabs.addTab(storage_page, "What it stores")
        tabs.addTab(self.look_panel, "Look at a prompt")
        self.math_panel = MathPanel(window)
        tabs.addTab(self.math_panel, "Check the math")
        self.tabs = tabs
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(title)
        lay.addWidget(tabs, 1)
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

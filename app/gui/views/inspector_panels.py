"""Inspector panels: the check-the-math table and the expert-routing grid.

`MathPanel` asks the engine thread for `engine.inspect.check_math` (the engine's residual
stream, final norm and logits against an independent float64 numpy forward) and shows one row
per state with the overall max-abs line. `RoutingModel` is a Qt table model of the expert
choices `engine.inspect.look` captured: one row per prompt token, one column per MoE layer, the
cell coloured by its first-choice expert. Neither knows how the numbers are computed.
"""

from __future__ import annotations

import colorsys
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PySide6.QtGui import QBrush, QColor
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

from app.gui.models.library import RecordTableModel


def token_label(text: str) -> str:
    """A token as an axis/header label: visible spaces and newlines, never empty."""
    if text == "":
        return "∅"
    shown = text.replace("\n", "⏎").replace("\t", "⇥")
    return shown.strip() or shown.replace(" ", "␣")


def expert_colour(expert: int, n_experts: int) -> QColor:
    """A distinct, readable hue per expert id (golden-ratio spaced around the wheel)."""
    hue = (expert * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.72, 0.65)
    return QColor(int(r * 255), int(g * 255), int(b * 255))


class RoutingModel(QAbstractTableModel):
    """tokens × MoE layers; a cell shows the chosen experts, coloured by the first choice."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.tokens: list[str] = []
        self.layers: list[int] = []
        self.ids: dict[int, Any] = {}  # layer -> (L, k) expert ids
        self.weights: dict[int, Any] = {}  # layer -> (L, k) weights
        self.n_experts = 0

    def set_routes(self, tokens: list[str], router: dict, n_experts: int = 0) -> None:
        self.beginResetModel()
        self.tokens = list(tokens)
        self.layers = sorted(int(k) for k in router)
        self.ids = {int(k): v[0] for k, v in router.items()}
        self.weights = {int(k): v[1] for k, v in router.items()}
        seen = max((int(a.max()) + 1 for a in self.ids.values() if a.size), default=0)
        self.n_experts = max(int(n_experts or 0), seen)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.tokens)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.layers)

    def headerData(self, section: int, orientation, role: int = Qt.DisplayRole):  # noqa: N802
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal:
            return f"layer {self.layers[section]}"
        return f"{section} {token_label(self.tokens[section])}"

    def choice(self, row: int, col: int) -> tuple[list[int], list[float]]:
        layer = self.layers[col]
        return (
            [int(e) for e in self.ids[layer][row]],
            [float(w) for w in self.weights[layer][row]],
        )

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        experts, weights = self.choice(index.row(), index.column())
        if role == Qt.DisplayRole:
            return " · ".join(str(e) for e in experts)
        if role == Qt.BackgroundRole:
            return QBrush(expert_colour(experts[0], self.n_experts))
        if role == Qt.ForegroundRole:
            return QBrush(QColor("#111111"))
        if role == Qt.TextAlignmentRole:
            return int(Qt.AlignCenter)
        if role == Qt.ToolTipRole:
            token = token_label(self.tokens[index.row()])
            parts = ", ".join(f"expert {e}: {w:.2f}" for e, w in zip(experts, weights))
            return f"{token!r} at layer {self.layers[index.column()]}: {parts}"
        if role == Qt.UserRole:
            return experts[0]
        return None


class RoutingGrid(QWidget):
    """The routing table with its caption; hidden for dense models."""

    def __init__(self) -> None:
        super().__init__()
        self.model = RoutingModel(self)
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setShowGrid(False)
        self.view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.view.verticalHeader().setDefaultSectionSize(22)
        self.caption = QLabel("")
        self.caption.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.caption)
        lay.addWidget(self.view, 1)

    def show_routes(self, tokens: list[str], router: dict, n_experts: int = 0) -> None:
        self.model.set_routes(tokens, router or {}, n_experts)
        if not router:
            self.hide()
            return
        k = next(iter(self.model.ids.values())).shape[-1] if self.model.ids else 0
        self.caption.setText(
            f"<b>Expert routing</b>: each token's top-{k} of {self.model.n_experts} experts "
            f"per MoE layer, first choice first; the colour is the first choice's expert. "
            "Hover a cell for the router weights."
        )
        self.show()


class MathRowsModel(RecordTableModel):
    columns = [
        ("State", lambda r: r[0]),
        ("max |engine − reference|", lambda r: f"{r[1]:.3e}"),
        ("max |reference|", lambda r: f"{r[2]:.3e}"),
        ("relative", lambda r: f"{r[1] / max(1.0, r[2]):.2e}"),
    ]
    tolerance = float("inf")

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if index.isValid() and role == Qt.ForegroundRole:
            name, diff, scale = self.rows[index.row()]
            if diff / max(1.0, scale) > self.tolerance:
                return QBrush(QColor("#c62828"))
        if index.isValid() and role == Qt.TextAlignmentRole and index.column() > 0:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return super().data(index, role)


class MathPanel(QWidget):
    """ "Check the math": the engine vs an independent float64 numpy forward, per layer."""

    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        self.result: dict = {}
        intro = QLabel(
            "Runs the prompt through the engine and through an independent float64 numpy "
            "implementation of the same architecture (no MLX in it), and compares every "
            "residual-stream state, the final norm and the logits."
        )
        intro.setWordWrap(True)
        self.prompt = QLineEdit("The quick brown fox jumps over the lazy dog.")
        self.prompt.returnPressed.connect(self.run)
        self.button = QPushButton("Check the math")
        self.button.clicked.connect(self.run)
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        row.addWidget(self.button)
        self.model = MathRowsModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.verticalHeader().hide()
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setMaximumWidth(900)
        self.summary = QLabel("")
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addLayout(row)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.summary)
        window.client.checked.connect(self._on_result)

    def run(self) -> None:
        if self.window.client.info is None:
            self.summary.setText("Load a model first.")
            return
        self.button.setEnabled(False)
        self.summary.setText("Computing both forward passes…")
        self.window.client.check_math(self.prompt.text())

    def _on_result(self, result: dict) -> None:
        self.button.setEnabled(True)
        self.result = result
        if "error" in result:
            self.model.set_rows([])
            self.summary.setText(f"<span style='color:#c62828'>{result['error']}</span>")
            return
        self.model.tolerance = result["tolerance"]
        self.model.set_rows(result["rows"])
        verdict = (
            "<span style='color:#2e7d32'>within tolerance</span>"
            if result["ok"]
            else "<span style='color:#c62828'><b>exceeds the tolerance</b></span>"
        )
        self.summary.setText(
            f"{result['dtype']}, {result['n_tokens']} tokens: largest relative difference "
            f"{result['max_rel']:.2e}, tolerance {result['tolerance']:.0e}: {verdict}<br>"
            f"<b>max abs difference: {result['max_abs']:.6e}</b>"
        )

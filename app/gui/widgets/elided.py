"""A one-line label that shrinks with "…" instead of pushing its neighbours off a toolbar."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QLabel, QSizePolicy


class ElidedLabel(QLabel):
    def __init__(self, text: str = "", min_width: int = 80) -> None:
        super().__init__(text)
        self._min = min_width
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(self._min, super().minimumSizeHint().height())

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(
            self.fontMetrics().horizontalAdvance(self.text()) + 20, super().sizeHint().height()
        )

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        rect = self.contentsRect()
        m = self.margin() + 8  # the stylesheet's side padding
        rect.adjust(m, 0, -m, 0)
        text = self.fontMetrics().elidedText(self.text(), Qt.ElideRight, rect.width())
        p.setPen(self.palette().color(self.foregroundRole()))
        p.drawText(rect, int(Qt.AlignVCenter | Qt.AlignLeft), text)

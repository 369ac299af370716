"""A non-modal banner across the top of the window for errors and notices.

It never blocks: the message stays until dismissed or replaced, and the app keeps working.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QToolButton

STYLES = {
    "error": ("#fdecea", "#8a1c12", "#f5c2bd"),
    "warning": ("#fff4e0", "#7a4b00", "#f3d19c"),
    "info": ("#e8f1fd", "#0b3d7a", "#b9d3f5"),
}


class Banner(QFrame):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("banner")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(12, 6, 6, 6)
        lay.addWidget(self.label, 1)
        lay.addWidget(close)
        self.kind = "error"
        self.hide()

    def show_message(self, text: str, kind: str = "error") -> None:
        bg, fg, border = STYLES.get(kind, STYLES["error"])
        self.kind = kind
        self.setStyleSheet(
            f"QFrame#banner {{ background: {bg}; border: 1px solid {border}; border-radius: 6px; }}"
            f" QLabel {{ color: {fg}; }} QToolButton {{ color: {fg}; }}"
        )
        prefix = {"error": "Error: ", "warning": "", "info": ""}.get(kind, "")
        self.label.setText(prefix + text)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""

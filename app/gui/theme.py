"""Light and dark palettes for the Fusion style, following the system's colour scheme.

`apply_theme(app, mode)` with mode "system" (QStyleHints.colorScheme), "light" or "dark".
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication


def _dark_palette() -> QPalette:
    p = QPalette()
    c = {
        QPalette.Window: "#1f2125",
        QPalette.WindowText: "#e6e6e6",
        QPalette.Base: "#17181b",
        QPalette.AlternateBase: "#25272c",
        QPalette.ToolTipBase: "#2b2d31",
        QPalette.ToolTipText: "#e6e6e6",
        QPalette.Text: "#e6e6e6",
        QPalette.Button: "#2b2d31",
        QPalette.ButtonText: "#e6e6e6",
        QPalette.BrightText: "#ff6b6b",
        QPalette.Highlight: "#3d6fd1",
        QPalette.HighlightedText: "#ffffff",
        QPalette.Link: "#8ab4f8",
        QPalette.PlaceholderText: "#8a8f98",
        QPalette.Mid: "#8a8f98",
    }
    for role, col in c.items():
        p.setColor(role, QColor(col))
    p.setColor(QPalette.Disabled, QPalette.ButtonText, QColor("#6b6f76"))
    p.setColor(QPalette.Disabled, QPalette.Text, QColor("#6b6f76"))
    return p


def _light_palette() -> QPalette:
    p = QPalette()
    c = {
        QPalette.Window: "#f4f5f7",
        QPalette.WindowText: "#1d1f23",
        QPalette.Base: "#ffffff",
        QPalette.AlternateBase: "#f0f2f5",
        QPalette.Text: "#1d1f23",
        QPalette.Button: "#ffffff",
        QPalette.ButtonText: "#1d1f23",
        QPalette.Highlight: "#2f6fde",
        QPalette.HighlightedText: "#ffffff",
        QPalette.Link: "#1a5fb4",
        QPalette.PlaceholderText: "#8a8f98",
        QPalette.Mid: "#6b7280",
        QPalette.ToolTipBase: "#ffffff",
        QPalette.ToolTipText: "#1d1f23",
    }
    for role, col in c.items():
        p.setColor(role, QColor(col))
    for role in (QPalette.ButtonText, QPalette.Text, QPalette.WindowText):
        p.setColor(QPalette.Disabled, role, QColor("#a0a4ab"))
    return p


def is_dark(app: QApplication, mode: str = "system") -> bool:
    if mode in ("light", "dark"):
        return mode == "dark"
    return app.styleHints().colorScheme() == Qt.ColorScheme.Dark


def apply_theme(app: QApplication, mode: str = "system") -> None:
    app.setStyle("Fusion")
    app.setPalette(_dark_palette() if is_dark(app, mode) else _light_palette())
    # widgets with a style sheet keep the palette they were polished with: re-polish those of
    # the open windows (closed windows waiting for deletion, e.g. with pyqtgraph views whose
    # Python side is gone, must not be touched: re-styling them can crash)
    import shiboken6
    from PySide6.QtWidgets import QWidget

    for top in app.topLevelWidgets():
        # a window half-way through destruction can come back as a bare QObject wrapper
        if not isinstance(top, QWidget) or not shiboken6.isValid(top) or not top.isVisible():
            continue
        for w in [top, *top.findChildren(QWidget)]:
            if not isinstance(w, QWidget) or not shiboken6.isValid(w):
                continue
            sheet = w.styleSheet()
            if sheet:
                w.setStyleSheet("")
                w.setStyleSheet(sheet)
    font = app.font()
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
    app.setFont(font)


def follow_system(app: QApplication, get_mode) -> None:
    """Re-apply the palette whenever the system switches light/dark (if mode is "system")."""
    app.styleHints().colorSchemeChanged.connect(lambda *_: apply_theme(app, get_mode()))

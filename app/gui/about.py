"""The About box: the app's name, icon and version (from pyproject.toml, via the installed or
packaged distribution's metadata), the versions of what it runs on, and where it keeps data.

`install_about(window)` adds Help > About Latent Studio to a QMainWindow's menu bar (on macOS Qt
moves it to the application menu). Knows nothing about the engine or the views.
"""

from __future__ import annotations

import platform
import sys
from html import escape
from pathlib import Path

ICON = Path(__file__).resolve().parents[2] / "resources" / "icon.png"


def about_facts() -> dict[str, str]:
    """What the About box states, as label -> value."""
    from PySide6 import __version__ as pyside_version
    from PySide6.QtCore import qVersion

    from app import __version__
    from engine.paths import data_dir

    try:
        import mlx.core as mx

        mlx_version = mx.__version__
    except Exception as e:  # noqa: BLE001 - the box must open even if MLX cannot load
        mlx_version = f"unavailable ({type(e).__name__})"
    return {
        "Version": __version__,
        "MLX": mlx_version,
        "Qt": f"{qVersion()} (PySide6 {pyside_version})",
        "Python": f"{platform.python_version()} on {platform.system()} {platform.machine()}",
        "Build": "packaged app" if getattr(sys, "frozen", False) else "Python install",
        "Data folder": str(data_dir()),
    }


def about_html() -> str:
    rows = "".join(
        f"<tr><td><b>{escape(k)}</b>&nbsp;&nbsp;</td><td>{escape(v)}</td></tr>"
        for k, v in about_facts().items()
    )
    return (
        "<h2>Latent Studio</h2>"
        "<p>Chat with, download and fine-tune language models on your own computer, on an MLX "
        "engine of its own. Nothing you type leaves this machine.</p>"
        f"<table>{rows}</table>"
        "<p>Licensed under the Apache License 2.0.</p>"
    )


def show_about(parent=None) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QPixmap
    from PySide6.QtWidgets import QMessageBox

    box = QMessageBox(parent)
    box.setWindowTitle("About Latent Studio")
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setText(about_html())
    pixmap = QPixmap(str(ICON))
    if not pixmap.isNull():
        box.setIconPixmap(pixmap.scaled(96, 96))
    box.exec()


def install_about(window) -> object:
    """Add Help > About Latent Studio to `window`'s menu bar; returns the QAction."""
    from PySide6.QtGui import QAction

    action = QAction("About Latent Studio", window)
    action.setMenuRole(QAction.MenuRole.AboutRole)
    action.triggered.connect(lambda: show_about(window))
    window.menuBar().addMenu("&Help").addAction(action)
    window.about_action = action
    return action

"""app/gui: the PySide6 desktop app (see main_window.py). Importing it applies `qtfix`."""

from app.gui import qtfix as _qtfix

_qtfix.apply()

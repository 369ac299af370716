"""A guard against reference-count bugs in PySide6 6.12 on Python < 3.12.

There, `SignalInstance.emit()` returns `True` without taking a reference, and some wrapped
calls (pyqtgraph's plot updates hit them) return `None` the same way; every such call drops one
reference to a singleton, and after a few hundred streamed tokens or plotted points the
interpreter aborts with "bool_dealloc" / "none_dealloc". Python 3.12 made these singletons
immortal, which hides the bugs. On older Pythons we give None, True and False that immortality
by hand: a reference count they can never lose (they are never freed anyway). Nothing else is
touched.
"""

from __future__ import annotations

import ctypes
import sys

_IMMORTAL = 1 << 40
_applied = False


def emit_leaks_true() -> bool:
    """Whether this PySide6 has the emit() bug (for tests and the record)."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    return sys.getrefcount(True) < before - 4


def apply() -> bool:
    """Make None/True/False effectively immortal on Python < 3.12; returns whether it did."""
    global _applied
    if _applied or sys.version_info >= (3, 12):
        return _applied
    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += _IMMORTAL
    _applied = True
    return _applied

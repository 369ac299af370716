"""A guard against a reference-count bug in PySide6 6.12 on Python < 3.12.

`SignalInstance.emit()` there returns `True` without taking a reference, so every emit from
Python (ours, pyqtgraph's, pytest-qt's) drops one reference to `True`; after a few hundred
streamed tokens the interpreter aborts with "bool_dealloc: deallocating True or False".
Python 3.12 made True/False immortal, which hides the bug. We detect the leak once and, if it
is there, give True and False the same immortality by hand: a huge reference count they
can never lose (the singletons are never freed anyway). Nothing else is touched.
"""

from __future__ import annotations

import ctypes
import sys

_IMMORTAL = 1 << 40
_applied = False


def emit_leaks_true() -> bool:
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    return sys.getrefcount(True) < before - 4


def apply() -> bool:
    """Make True/False effectively immortal if emit() leaks; returns whether it did."""
    global _applied
    if _applied or sys.version_info >= (3, 12):
        return _applied
    if emit_leaks_true():
        for obj in (True, False):
            ctypes.c_ssize_t.from_address(id(obj)).value += _IMMORTAL
        _applied = True
    return _applied

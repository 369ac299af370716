"""Qt plumbing the app relies on: signals can be emitted and plots updated without limit
(PySide6 6.12 on Python 3.11 frees `True`/`None` after a few hundred emits or plot updates
unless `app.gui.qtfix` guards them; checked in a fresh interpreter, where the abort would show), and the dark/light palettes are applied and
re-render the transcript in matching colours."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PySide6.QtGui import QPalette

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    """Chats, settings, downloads and adapters go to a temp LATENT_HOME, never the user's."""
    return latent_home


EMIT_MANY = """
import app.gui
from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QApplication
from app.gui.views.finetune import LossPlot
app = QApplication([])
class A(QObject):
    s = Signal(object)
a = A()
a.s.connect(lambda v: None)
for i in range(20000):
    a.s.emit({"done": True})
plot = LossPlot()
for i in range(3000):  # pyqtgraph updates drop references to None
    plot.add(i, 1.0 / (i + 1), None, False)
print("ok")
"""


@pytest.mark.slow
def test_many_emits_do_not_abort():
    r = subprocess.run(
        [sys.executable, "-c", EMIT_MANY], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-500:]


def test_dark_and_light_palettes(qtbot, tmp_path):
    from fake_engine import make_window
    from PySide6.QtWidgets import QApplication

    from app.gui.theme import apply_theme

    app = QApplication.instance()
    old = app.palette()
    win = make_window(qtbot, tmp_path / "c.sqlite")
    win.chat.composer.setPlainText("hi")
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        win.chat.send()
    try:
        apply_theme(app, "dark")
        assert app.palette().color(QPalette.Window).lightness() < 80
        qtbot.waitUntil(win.chat.transcript._dark, timeout=2000)
        dark_html = win.chat.transcript.toHtml()
        assert "#2b3a55" in dark_html  # the user bubble's dark colour
        apply_theme(app, "light")
        assert app.palette().color(QPalette.Window).lightness() > 200
        qtbot.waitUntil(lambda: not win.chat.transcript._dark(), timeout=2000)
        assert "#e8effc" in win.chat.transcript.toHtml()
    finally:
        app.setPalette(old)
        win.shutdown()

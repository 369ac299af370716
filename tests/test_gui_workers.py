"""The GUI never runs model code on its own thread: a QTimer keeps ticking (no gap near the
length of the blocking call) while a reply streams and while a model loads; the engine runs on
one engine thread (load and chat on the same thread); task callbacks come back on the GUI thread; and the
first-run welcome panel fetches the default model with progress, then the chat is ready."""

from __future__ import annotations

import threading
import time

import pytest
from fake_engine import FakeEngine, make_window
from PySide6.QtCore import QObject, QThread, QTimer, Signal

from app.gui.workers import run_task

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    """Chats, settings, downloads and adapters go to a temp LATENT_HOME, never the user's."""
    return latent_home


class TickRecorder:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))

    def __enter__(self) -> TickRecorder:
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.stop()

    def max_gap(self) -> float:
        return max(b - a for a, b in zip(self.times, self.times[1:]))


class _Done(QObject):
    sig = Signal()

    def fire(self) -> None:
        self.sig.emit()


class ThreadRecordingEngine(FakeEngine):
    def load(self, path, adapter=None):
        self.load_thread = threading.get_ident()
        return super().load(path, adapter)

    def chat(self, messages, params=None):
        self.chat_thread = threading.get_ident()
        yield from super().chat(messages, params)


def test_event_loop_turns_while_loading_and_streaming(qtbot, tmp_path):
    eng = ThreadRecordingEngine(load_delay=1.0, delay=0.06)
    win = make_window(qtbot, tmp_path / "c.sqlite", eng, load=False)
    with TickRecorder() as ticks, qtbot.waitSignal(win.client.loaded, timeout=5000):
        win.load_model("/fake/model.gguf")
        assert win.client.loading and not win.load_btn.isEnabled()
    # a GUI thread blocked by the load would show one gap of >= 1 s
    assert len(ticks.times) >= 20 and ticks.max_gap() < 0.5
    win.chat.composer.setPlainText("hello")
    with TickRecorder() as ticks, qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        win.chat.send()
    # the whole reply takes ~0.8 s; blocking would show it as one gap
    assert len(ticks.times) >= 15 and ticks.max_gap() < 0.5
    main = threading.get_ident()
    assert eng.load_thread == eng.chat_thread != main
    win.shutdown()


def test_run_task_reports_on_gui_thread(qtbot):
    seen = {}

    def work(task):
        seen["worker"] = QThread.currentThread()
        for i in range(3):
            task.progress.emit(i)
        return 42

    progress = []
    done = _Done()
    with qtbot.waitSignal(done.sig, timeout=5000):
        run_task(
            work,
            on_progress=progress.append,
            on_done=lambda r: (seen.update(done=(r, QThread.currentThread())), done.fire()),
        )
    assert seen["done"][0] == 42 and progress == [0, 1, 2]
    assert seen["done"][1] is not seen["worker"]
    assert seen["done"][1] == QThread.currentThread()


def test_run_task_failure_is_one_line(qtbot):
    from engine.errors import DownloadError

    got = []
    done = _Done()
    with qtbot.waitSignal(done.sig, timeout=5000):
        run_task(
            lambda t: (_ for _ in ()).throw(DownloadError("repo x/y: 404 not found")),
            on_failed=lambda m: (got.append(m), done.fire()),
        )
    assert got == ["repo x/y: 404 not found"]


def test_first_run_welcome_fetches_then_chat_is_ready(qtbot, tmp_path, latent_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no models anywhere
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def fetcher(task):  # stands in for engine.defaults.ensure_default_model
        for done in (0, 50, 100):
            task.progress.emit(("SmolLM2-135M-Instruct.Q4_1.gguf", done, 100))
            time.sleep(0.02)
        return "/fake/SmolLM2-135M-Instruct.Q4_1.gguf"

    win = make_window(qtbot, tmp_path / "c.sqlite", load=False, fetcher=fetcher)
    win.start()  # nothing on disk in this LATENT_HOME: the welcome panel shows
    assert win.chat.center.currentWidget() is win.welcome
    with qtbot.waitSignal(win.client.loaded, timeout=5000):
        win.welcome.button.click()
    assert win.welcome.progress.value() == win.welcome.progress.maximum()
    assert win.chat.center.currentIndex() == 0
    assert win.store.setting("last_model") == "/fake/SmolLM2-135M-Instruct.Q4_1.gguf"
    win.chat.composer.setPlainText("hi")
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        win.chat.send()
    win.shutdown()

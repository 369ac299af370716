"""Start the desktop app (`latent` with no argument), or its offscreen smoke test.

`run_app(smoke_test=True)` opens the main window offscreen on the real engine and the default
model, sends one prompt, prints the reply and returns 0 (1 on any failure or after 10 minutes).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
SMOKE_PROMPT = "In one sentence, what is the capital of France?"


def make_app(argv: list[str] | None = None):
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from app.gui.theme import apply_theme

    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("Latent Studio")
    app.setOrganizationName("latent-studio")
    app.setDesktopFileName("latent-studio")
    for name in ("icon.svg", "icon.png"):
        icon = QIcon(str(RESOURCES / name))
        if not icon.isNull():
            app.setWindowIcon(icon)
            break
    apply_theme(app, "system")
    return app


def run_app(smoke_test: bool = False) -> int:
    if smoke_test:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return _smoke()
    from app.gui.main_window import MainWindow
    from app.gui.theme import apply_theme, follow_system

    app = make_app()
    win = MainWindow()
    mode = win.store.setting("theme", "system")
    apply_theme(app, mode)
    follow_system(app, lambda: win.store.setting("theme", "system"))
    win.show()
    return app.exec()


def _smoke() -> int:
    from PySide6.QtCore import QTimer

    from app.gui.main_window import MainWindow
    from app.store import Store
    from engine.defaults import ensure_default_model

    app = make_app()
    path = ensure_default_model(progress=lambda *a: None)
    tmp = tempfile.TemporaryDirectory(prefix="latent-smoke-")
    store = Store(Path(tmp.name) / "chats.sqlite")  # the user's chats are left alone
    win = MainWindow(store=store, autoload=False)
    win.show()
    result = {"rc": 1}

    def loaded(_info: dict) -> None:
        win.chat.new_conversation()
        win.chat.sampling.set_values({"temperature": 0.0, "max_tokens": 48, "seed": 0})
        win.chat.composer.setPlainText(SMOKE_PROMPT)
        win.chat.send()

    def finished(stats: dict) -> None:
        msgs = win.chat.messages()
        reply = msgs[-1].content if msgs and msgs[-1].role == "assistant" else ""
        print(f"prompt: {SMOKE_PROMPT}")
        print(f"reply: {reply.strip()}")
        print(f"stats: {stats}")
        result["rc"] = 0 if reply.strip() else 1
        app.quit()

    def failed(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        app.quit()

    win.client.loaded.connect(loaded)
    win.client.load_failed.connect(failed)
    win.chat.reply_finished.connect(finished)
    win.chat.error.connect(failed)
    QTimer.singleShot(600_000, app.quit)
    win.load_model(str(path))
    app.exec()
    win.shutdown()
    store.close()
    tmp.cleanup()
    return result["rc"]

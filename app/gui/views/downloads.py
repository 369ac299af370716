"""Downloads: every Hub download with progress, speed, pause / resume / cancel.

The list is `engine.hub.DownloadManager`'s, which keeps its state on disk, so it survives a
restart (a running job comes back queued and goes on from its partial files). The manager's
callbacks arrive on its own thread; they only set a flag, and a GUI timer refreshes the table.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QPainter, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QStyledItemDelegate,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.gui.models.library import DownloadsModel


class ProgressDelegate(QStyledItemDelegate):
    """A flat progress bar with the byte counts on it (drawn by hand: same look everywhere)."""

    def paint(self, painter, option, index) -> None:
        frac = max(0.0, min(1.0, float(index.data(Qt.UserRole + 1) or 0.0)))
        pal = option.palette
        rect = option.rect.adjusted(4, 7, -4, -7)
        painter.save()
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setPen(Qt.NoPen)
        painter.setBrush(pal.color(QPalette.AlternateBase))
        painter.drawRoundedRect(rect, 4, 4)
        if frac > 0:
            done = rect.adjusted(0, 0, -int(rect.width() * (1 - frac)), 0)
            painter.setBrush(pal.color(QPalette.Highlight))
            painter.drawRoundedRect(done, 4, 4)
        text = f"{index.data()}  ({frac:.0%})"
        split = rect.left() + int(rect.width() * frac)
        for color, clip in (
            (QPalette.HighlightedText, rect.adjusted(0, 0, split - rect.right(), 0)),
            (QPalette.Text, rect.adjusted(split - rect.left(), 0, 0, 0)),
        ):
            painter.setClipRect(clip)
            painter.setPen(pal.color(color))
            painter.drawText(rect, Qt.AlignCenter, text)
        painter.restore()


class DownloadsView(QWidget):
    def __init__(self, window: Any, state_dir=None) -> None:
        super().__init__()
        self.window = window
        self.manager = None
        self.model = DownloadsModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setItemDelegateForColumn(2, ProgressDelegate(self.table))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(34)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.ElideMiddle)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.Interactive)
        hh.setSectionResizeMode(0, QHeaderView.Stretch)
        for col, width in ((1, 220), (2, 280), (3, 170), (4, 150)):
            self.table.setColumnWidth(col, width)
        self.buttons = {}
        row = QHBoxLayout()
        for name in ("Pause", "Resume", "Cancel"):
            b = QPushButton(name)
            b.clicked.connect(lambda _=False, n=name.lower(): self.act(n))
            row.addWidget(b)
            self.buttons[name.lower()] = b
        row.addStretch(1)
        self.summary = QLabel("")
        row.addWidget(self.summary)
        title = QLabel("Downloads")
        title.setStyleSheet("font-size: 15px; font-weight: 600;")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(title)
        lay.addWidget(self.table, 1)
        lay.addLayout(row)
        self._dirty = True
        self._timer = QTimer(self, interval=250)
        self._timer.timeout.connect(self._tick)
        try:
            from engine.hub import DownloadManager
            from engine.paths import data_dir

            self.manager = DownloadManager(state_dir or data_dir() / "downloads")
            self._unsub = self.manager.subscribe(self._on_event)
        except Exception as e:  # noqa: BLE001 - the Hub part has not landed
            self.summary.setText(f"Downloads are not available yet ({e}).")
            for b in self.buttons.values():
                b.setEnabled(False)
        self._timer.start()
        self.refresh()

    def _on_event(self, _event: Any) -> None:  # any thread
        self._dirty = True

    def _tick(self) -> None:
        if self._dirty:
            self._dirty = False
            self.refresh()

    def refresh(self) -> None:
        if self.manager is None:
            return
        sel = self.selected_job()
        jobs = self.manager.jobs()
        first = not hasattr(self, "_seen_done")
        before = {j.id: j.status for j in self.model.rows}
        was_done = {i for i, st in before.items() if st == "done"}
        self._seen_done = True
        self.model.set_rows(jobs)
        if sel:
            for i, j in enumerate(jobs):
                if j.id == sel:
                    self.table.selectRow(i)
        active = sum(j.status in ("queued", "running") for j in jobs)
        self.summary.setText(
            f"{active} active, {len(jobs)} in all" if jobs else "No downloads yet."
        )
        if not first and any(j.status == "done" and j.id not in was_done for j in jobs):
            self.window.refresh_models()  # a finished download is a new local model
        for j in jobs:  # a download that just failed: say so in the banner, not only the table
            if not first and j.status in ("failed", "disk full") and before.get(j.id) != j.status:
                self.window.show_error(f"download of {j.repo_id} {j.status}: {j.error or ''}")

    def selected_job(self) -> str | None:
        ix = self.table.currentIndex()
        return self.model.job_id(ix.row()) if ix.isValid() else None

    def act(self, what: str, job_id: str | None = None) -> None:
        job_id = job_id or self.selected_job()
        if self.manager is None or job_id is None:
            return
        try:
            getattr(self.manager, what)(job_id)
        except Exception as e:  # noqa: BLE001
            from app.gui.workers import error_text

            self.window.show_error(error_text(e))
        self._dirty = True

    def shutdown(self) -> None:
        self._timer.stop()
        if self.manager is not None:
            self.manager.close()


def make_view(window: Any) -> QWidget:
    return DownloadsView(window)

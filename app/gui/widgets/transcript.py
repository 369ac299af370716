"""The conversation transcript: a QTextBrowser showing messages as Markdown bubbles.

Each message carries action links (`copy:<i>`, `edit:<i>`, `regen:<i>`, `copy-code:<i>:<j>`)
that are emitted as `action(kind, index, block)`. While a reply streams, only a re-render at
most every 40 ms happens (not one per token) and only the streaming bubble is replaced (the
finished messages are not laid out again); the view stays pinned to the bottom only if the user
was already there.
"""

from __future__ import annotations

import html

from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import QPalette, QTextCursor
from PySide6.QtWidgets import QTextBrowser

from app.gui.render import render_markdown


def fmt_stats(stats: dict) -> str:
    parts = []
    n = stats.get("generated_tokens")
    if n:
        parts.append(f"{n} tokens")
    if stats.get("decode_tps"):
        parts.append(f"{stats['decode_tps']:.1f} tok/s")
    if stats.get("ttft_s"):
        parts.append(f"first token {stats['ttft_s'] * 1000:.0f} ms")
    reason = stats.get("finish_reason")
    if reason == "cancelled":
        parts.append("stopped")
    elif reason == "length":
        parts.append("hit max tokens")
    elif reason == "context":
        parts.append("hit the context limit")
    return " · ".join(parts)


class Transcript(QTextBrowser):
    action = Signal(str, int, int)  # kind, message index, code block index

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self.document().setDocumentMargin(16)
        self.messages: list[tuple[str, str, dict]] = []  # (role, content, stats)
        self.streaming: str | None = None
        self.assistant_name = "Assistant"
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(40)
        self._timer.timeout.connect(self.render_stream)
        self._stream_pos: int | None = None  # where the streaming bubble starts
        self.empty_hint = "Start the conversation below."

    # ---- content -------------------------------------------------------------------------
    def set_messages(self, messages: list[tuple[str, str, dict]]) -> None:
        self.messages = list(messages)
        self.streaming = None
        self.render()

    def begin_stream(self) -> None:
        self.streaming = ""
        self.render()

    def append_stream(self, text: str) -> None:
        self.streaming = (self.streaming or "") + text
        if not self._timer.isActive():
            self._timer.start()

    def end_stream(self) -> None:
        self.streaming = None
        self._timer.stop()

    # ---- rendering -----------------------------------------------------------------------
    def _dark(self) -> bool:
        return self.palette().color(QPalette.Base).lightness() < 128

    def render(self) -> None:
        dark = self._dark()
        text_color = self.palette().color(QPalette.Text).name()
        muted = "#9aa0a6" if dark else "#6b7280"
        link = "#8ab4f8" if dark else "#1a5fb4"
        user_bg = "#2b3a55" if dark else "#e8effc"
        parts = [f'<body style="color:{text_color};">']
        if not self.messages and self.streaming is None:
            parts.append(
                f'<p align="center" style="color:{muted}; margin-top:80px; font-size:large;">'
                f"{html.escape(self.empty_hint)}</p>"
            )
        last_assistant = max(
            (i for i, m in enumerate(self.messages) if m[0] == "assistant"), default=-1
        )
        for i, (role, content, stats) in enumerate(self.messages):
            if role == "system":
                continue
            actions = [f'<a href="copy:{i}" style="color:{link}; text-decoration:none;">Copy</a>']
            if role == "user":
                actions.append(
                    f'<a href="edit:{i}" style="color:{link}; text-decoration:none;">Edit</a>'
                )
            elif i == last_assistant and self.streaming is None:
                actions.append(
                    f'<a href="regen:{i}" style="color:{link}; text-decoration:none;">Regenerate</a>'
                )
            meta = fmt_stats(stats) if role == "assistant" else ""
            parts.append(
                self._bubble(role, render_markdown(content, dark, i), actions, meta, user_bg, muted)
            )
        parts.append("</body>")
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 30
        keep = bar.value()
        self.setHtml("".join(parts))
        self._stream_pos = None
        if self.streaming is not None:
            end = QTextCursor(self.document())
            end.movePosition(QTextCursor.End)
            self._stream_pos = end.position()
            self._insert_stream()
        bar.setValue(bar.maximum() if at_bottom else keep)

    def render_stream(self) -> None:
        """Replace only the streaming bubble: the finished messages are not laid out again."""
        if self.streaming is None:
            return
        if self._stream_pos is None:
            self.render()
            return
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 30
        keep = bar.value()
        self._insert_stream()
        bar.setValue(bar.maximum() if at_bottom else keep)

    def _insert_stream(self) -> None:
        dark = self._dark()
        muted = "#9aa0a6" if dark else "#6b7280"
        body = render_markdown((self.streaming or "") + " ▍", dark, len(self.messages))
        cursor = QTextCursor(self.document())
        cursor.setPosition(self._stream_pos)
        cursor.movePosition(QTextCursor.End, QTextCursor.KeepAnchor)
        cursor.beginEditBlock()
        cursor.removeSelectedText()
        cursor.insertHtml(self._bubble("assistant", body, [], "generating…", "", muted))
        cursor.endEditBlock()

    def _bubble(
        self, role: str, body: str, actions: list[str], meta: str, user_bg: str, muted: str
    ) -> str:
        who = "You" if role == "user" else html.escape(self.assistant_name)
        footer = " &nbsp;·&nbsp; ".join(actions)
        if meta:
            footer = f'<span style="color:{muted};">{html.escape(meta)}</span>' + (
                " &nbsp;·&nbsp; " + footer if footer else ""
            )
        head = f'<p style="margin:0 0 4px 0; color:{muted}; font-weight:600;">{who}</p>'
        foot = f'<p style="margin:6px 0 0 0; font-size:small;">{footer}</p>' if footer else ""
        if role == "user":
            return (
                '<table width="100%" cellspacing="0" cellpadding="0" style="margin-bottom:14px;">'
                '<tr><td width="18%"></td>'
                f'<td bgcolor="{user_bg}" style="padding:10px;">{head}{body}{foot}</td>'
                "</tr></table>"
            )
        return (
            '<table width="100%" cellspacing="0" cellpadding="0" style="margin-bottom:14px;">'
            f'<tr><td style="padding:10px;">{head}{body}{foot}</td></tr></table>'
        )

    def changeEvent(self, e) -> None:  # noqa: N802 - Qt override: light/dark switch
        from PySide6.QtCore import QEvent

        super().changeEvent(e)
        if e.type() == QEvent.PaletteChange:
            self.render()

    # ---- links ---------------------------------------------------------------------------
    def _on_anchor(self, url: QUrl) -> None:
        s = url.toString()
        kind, _, rest = s.partition(":")
        nums = [int(x) for x in rest.split(":") if x.isdigit()]
        if kind in ("copy", "edit", "regen", "copy-code") and nums:
            self.action.emit(kind, nums[0], nums[1] if len(nums) > 1 else -1)
        # any other link (a model's markdown link) is ignored: no surprise navigation

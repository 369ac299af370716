"""The chat view: conversation list, transcript, composer, system prompt and sampling panel.

Owns the conversation flow (send, stop, regenerate, edit-and-resend) on top of the store and
an `EngineClient`; it never calls the engine itself. A reply is saved when it ends (also when
stopped, with what was generated); it belongs to the conversation it started in.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.gui.models.conversations import ConversationListModel
from app.gui.render import code_blocks
from app.gui.widgets.composer import Composer
from app.gui.widgets.sampling import GUI_DEFAULTS, SamplingPanel
from app.gui.widgets.transcript import Transcript, fmt_stats
from app.gui.workers import EngineClient
from app.store import Store


class ChatView(QWidget):
    error = Signal(str)  # to the window's banner
    reply_finished = Signal(dict)

    def __init__(self, store: Store, client: EngineClient, parent=None) -> None:
        super().__init__(parent)
        self.store = store
        self.client = client
        self.conv_id: int | None = None
        self.req: int | None = None
        self.stream_conv: int | None = None
        self.stream_text = ""
        self.tokens_seen = 0
        self.editing_position: int | None = None
        self.context_used = 0
        self._build()
        client.token.connect(self._on_token)
        client.finished.connect(self._on_finished)
        client.failed.connect(self._on_failed)
        client.counted.connect(self._on_counted)
        client.loaded.connect(self._on_model_loaded)
        client.unloaded.connect(self._update_buttons)
        client.busy_changed.connect(lambda *_: self._update_buttons())
        ids = self.list_model.ids()
        if ids:
            self.open_conversation(ids[0])
        else:
            self.new_conversation()

    # ---- layout --------------------------------------------------------------------------
    def _build(self) -> None:
        # left: search, new, list
        self.search = QLineEdit(placeholderText="Search chats")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.set_search)
        self.new_btn = QPushButton("+  New chat")
        self.new_btn.clicked.connect(self.new_conversation)
        self.list_model = ConversationListModel(self.store, self)
        self.list = QListView()
        self.list.setModel(self.list_model)
        self.list.setEditTriggers(
            QAbstractItemView.EditKeyPressed | QAbstractItemView.DoubleClicked
        )
        self.list.setToolTip("Double-click or F2 to rename")
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._list_menu)
        self.list.clicked.connect(
            lambda ix: self.open_conversation(self.list_model.id_at(ix.row()))
        )
        self.list.setSpacing(2)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.ElideRight)
        self.list.setUniformItemSizes(True)
        side = QWidget()
        sl = QVBoxLayout(side)
        sl.setContentsMargins(8, 8, 4, 8)
        sl.addWidget(self.new_btn)
        sl.addWidget(self.search)
        sl.addWidget(self.list, 1)
        row = QHBoxLayout()
        ren = QPushButton("Rename")
        ren.clicked.connect(self._rename_current)
        dele = QPushButton("Delete")
        dele.clicked.connect(lambda: self.conv_id and self.delete_conversation(self.conv_id))
        row.addWidget(ren)
        row.addWidget(dele)
        sl.addLayout(row)

        # centre: transcript, notices, composer, meter
        self.title = QLabel()
        self.title.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.transcript = Transcript()
        self.transcript.setFrameShape(QFrame.NoFrame)
        self.transcript.action.connect(self._on_action)
        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.setStyleSheet("color: #b3261e; font-weight: 600;")
        self.notice.hide()
        self.composer = Composer()
        self.composer.submitted.connect(self.send)
        self.composer.escaped.connect(self._escape)
        self.send_btn = QPushButton("Send")
        self.send_btn.setDefault(True)
        self.send_btn.clicked.connect(self.send)
        self.stop_btn = QPushButton("Stop  (Esc)")
        self.stop_btn.clicked.connect(self.stop)
        self.regen_btn = QPushButton("Regenerate")
        self.regen_btn.clicked.connect(self.regenerate)
        btns = QVBoxLayout()
        btns.addWidget(self.send_btn)
        btns.addWidget(self.stop_btn)
        btns.addWidget(self.regen_btn)
        btns.addStretch(1)
        comp_row = QHBoxLayout()
        comp_row.addWidget(self.composer, 1)
        comp_row.addLayout(btns)
        self.stats = QLabel(" ")
        self.stats.setStyleSheet("color: palette(mid);")
        self.meter = QProgressBar()
        self.meter.setTextVisible(True)
        self.meter.setFixedWidth(220)
        self.meter.setFixedHeight(22)
        self.meter.setRange(0, 8192)
        self.meter.setValue(0)
        self.meter.setFormat("context 0 / 8,192")
        foot = QHBoxLayout()
        foot.addWidget(self.stats, 1)
        foot.addWidget(self.meter)
        chat_page = QWidget()
        cl = QVBoxLayout(chat_page)
        cl.setContentsMargins(12, 8, 12, 8)
        cl.addWidget(self.title)
        cl.addWidget(self.transcript, 1)
        cl.addWidget(self.notice)
        cl.addLayout(comp_row)
        cl.addLayout(foot)
        self.center = QStackedWidget()
        self.center.addWidget(chat_page)

        # right: system prompt + sampling
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("System prompt for this chat (optional)")
        self.system_prompt.setMaximumHeight(140)
        self._sys_timer = QTimer(self, singleShot=True, interval=400)
        self._sys_timer.timeout.connect(self._save_system_prompt)
        self.system_prompt.textChanged.connect(self._sys_timer.start)
        self.sampling = SamplingPanel()
        self.sampling.changed.connect(self._save_params)
        self.sampling.reset_requested.connect(self.reset_params)
        right_inner = QWidget()
        rl = QVBoxLayout(right_inner)
        rl.setContentsMargins(8, 8, 8, 8)
        for text, w in (("System prompt", self.system_prompt), ("Sampling", self.sampling)):
            lab = QLabel(text)
            lab.setStyleSheet("font-weight: 600;")
            rl.addWidget(lab)
            rl.addWidget(w)
        rl.addStretch(1)
        self.right = QScrollArea()
        self.right.setWidget(right_inner)
        self.right.setWidgetResizable(True)
        self.right.setFrameShape(QFrame.NoFrame)
        self.right.setMinimumWidth(250)

        split = QSplitter()
        split.addWidget(side)
        split.addWidget(self.center)
        split.addWidget(self.right)
        split.setStretchFactor(1, 1)
        split.setSizes([220, 700, 260])
        split.setChildrenCollapsible(False)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)
        esc = QShortcut(QKeySequence(Qt.Key_Escape), self, context=Qt.WidgetWithChildrenShortcut)
        esc.activated.connect(self._escape)
        self._update_buttons()

    def set_welcome(self, widget: QWidget | None) -> None:
        """Show a first-run panel instead of the chat page (None: back to the chat)."""
        self.right.setVisible(widget is None)
        if widget is None:
            self.center.setCurrentIndex(0)
            return
        if self.center.indexOf(widget) < 0:
            self.center.addWidget(widget)
        self.center.setCurrentWidget(widget)

    # ---- conversations -------------------------------------------------------------------
    def new_conversation(self) -> int:
        """Open a new, empty chat (the current one if it is still empty: no pile of blanks)."""
        if self.conv_id is not None and not self.messages() and not self.client.generating:
            self.search.clear()
            self.composer.setFocus()
            return self.conv_id
        conv = self.store.create_conversation(
            system_prompt=self.store.setting("default_system_prompt", "")
        )
        self.search.clear()
        self.list_model.refresh()
        self.open_conversation(conv.id)
        self.composer.setFocus()
        return conv.id

    def open_conversation(self, conv_id: int | None) -> None:
        if conv_id is None:
            return
        self._save_system_prompt()
        self.conv_id = conv_id
        self.editing_position = None
        conv = self.store.conversation(conv_id)
        self.title.setText(conv.title)
        self.system_prompt.blockSignals(True)
        self.system_prompt.setPlainText(conv.system_prompt)
        self.system_prompt.blockSignals(False)
        self.sampling.set_values(conv.params or self.model_defaults())
        self.notice.hide()
        self.stats.setText(" ")
        row = self.list_model.row_of(conv_id)
        if row >= 0:
            self.list.setCurrentIndex(self.list_model.index(row))
        self._reload()
        self.client.count(self.chat_messages(), self.conv_id)
        self.store.set_setting("last_conversation", conv_id)

    def rename_conversation(self, conv_id: int, title: str) -> None:
        self.store.rename(conv_id, title)
        self.list_model.refresh()
        if conv_id == self.conv_id:
            self.title.setText(self.store.conversation(conv_id).title)

    def delete_conversation(self, conv_id: int) -> None:
        if self.client.generating and self.stream_conv == conv_id:
            self.stop()
        self.store.delete_conversation(conv_id)
        self.list_model.refresh()
        if conv_id == self.conv_id:
            self.conv_id = None
            ids = self.list_model.ids()
            if ids:
                self.open_conversation(ids[0])
            else:
                self.new_conversation()

    def set_search(self, text: str) -> None:
        self.list_model.refresh(text)
        row = self.list_model.row_of(self.conv_id or -1)
        if row >= 0:
            self.list.setCurrentIndex(self.list_model.index(row))

    def _rename_current(self) -> None:
        if self.conv_id is None:
            return
        old = self.store.conversation(self.conv_id).title
        title, ok = QInputDialog.getText(self, "Rename chat", "Title:", text=old)
        if ok and title.strip():
            self.rename_conversation(self.conv_id, title)

    def _list_menu(self, pos) -> None:
        ix = self.list.indexAt(pos)
        conv_id = self.list_model.id_at(ix.row()) if ix.isValid() else None
        if conv_id is None:
            return
        menu = QMenu(self)
        menu.addAction("Rename", lambda: self.list.edit(ix))
        menu.addAction("Delete", lambda: self.delete_conversation(conv_id))
        menu.exec(self.list.viewport().mapToGlobal(pos))

    # ---- messages ------------------------------------------------------------------------
    def messages(self) -> list:
        return self.store.messages(self.conv_id) if self.conv_id is not None else []

    def chat_messages(self) -> list[dict]:
        """What the engine gets: the system prompt (if any) and the transcript."""
        out = []
        conv = self.store.conversation(self.conv_id)
        if conv.system_prompt.strip():
            out.append({"role": "system", "content": conv.system_prompt})
        out += [{"role": m.role, "content": m.content} for m in self.messages()]
        return out

    def _reload(self) -> None:
        msgs = self.messages()
        self.transcript.set_messages([(m.role, m.content, m.stats) for m in msgs])
        if self.client.generating and self.stream_conv == self.conv_id:
            self.transcript.begin_stream()
            self.transcript.append_stream(self.stream_text)
        self._update_buttons()

    def send(self) -> None:
        text = self.composer.toPlainText().strip()
        if not text or self.client.generating:
            return
        if self.client.info is None:
            self.error.emit("no model is loaded: pick one in the toolbar, or get the default model")
            return
        if self.editing_position is not None:
            self.store.replace_from(self.conv_id, self.editing_position, [("user", text, None)])
            self.editing_position = None
        else:
            self.store.add_message(self.conv_id, "user", text)
        conv = self.store.conversation(self.conv_id)
        if conv.title == "New chat":
            self.rename_conversation(self.conv_id, " ".join(text.split())[:48])
        self.composer.clear()
        self.list_model.refresh()
        self._start()

    def edit_message(self, position: int, new_text: str) -> None:
        """Replace the user message at `position` (and all after it) and resend."""
        if self.client.generating:
            return
        self.store.replace_from(self.conv_id, position, [("user", new_text, None)])
        self.editing_position = None
        self._start()

    def regenerate(self) -> None:
        if self.client.generating or self.client.info is None:
            return
        msgs = self.messages()
        if not msgs:
            return
        if msgs[-1].role == "assistant":
            self.store.replace_from(self.conv_id, msgs[-1].position, [])
        self._start()

    def stop(self) -> None:
        if self.client.generating:
            self.client.cancel()

    def _escape(self) -> None:
        if self.client.generating:
            self.stop()
        elif self.editing_position is not None:
            self.editing_position = None
            self.composer.clear()
            self.notice.hide()

    def _start(self) -> None:
        self._sys_timer.stop()
        self._save_system_prompt()  # typed just now: still waiting for its debounce
        self._reload()
        self.notice.hide()
        self.stream_conv = self.conv_id
        self.stream_text = ""
        self.tokens_seen = 0
        self.transcript.begin_stream()
        self.stats.setText("Generating…")
        self.req = self.client.generate(self.chat_messages(), self.sampling.values())
        self._update_buttons()

    def _on_token(self, req: int, text: str) -> None:
        if req != self.req:
            return
        self.stream_text += text
        self.tokens_seen += 1
        if self.stream_conv == self.conv_id:
            self.transcript.append_stream(text)

    def _on_finished(self, req: int, stats: dict) -> None:
        if req != self.req:
            return
        stats = dict(stats)
        context_used = stats.pop("context_used", None)
        if self.stream_text or stats.get("finish_reason") != "cancelled":
            self._save_reply(stats)
        self.req = None
        self.transcript.end_stream()
        if self.stream_conv == self.conv_id:
            self._reload()
            self.stats.setText(fmt_stats(stats) or " ")
            if context_used is not None:
                self._set_context(int(context_used))
            if stats.get("finish_reason") == "context":
                self._context_notice()
        self.list_model.refresh()
        self.reply_finished.emit(stats)

    def _on_failed(self, req: int, message: str) -> None:
        if req != self.req:
            return
        if self.stream_text:
            self._save_reply({"finish_reason": "error"})
        self.req = None
        self.transcript.end_stream()
        self._reload()
        self.stats.setText("The reply failed (see the message above).")
        if "context" in message.lower():
            self._context_notice()
        self.error.emit(message)

    def _save_reply(self, stats: dict) -> None:
        """Store the reply in the chat it belongs to, unless that chat was deleted meanwhile."""
        if any(c.id == self.stream_conv for c in self.store.conversations()):
            self.store.add_message(self.stream_conv, "assistant", self.stream_text, stats)

    def _context_notice(self) -> None:
        n = self.context_length()
        self.notice.setText(
            f"The conversation has reached the model's context limit ({n:,} tokens), so the reply "
            "was cut short. Start a new chat (Ctrl+N), or edit or delete earlier messages."
        )
        self.notice.show()

    def _on_action(self, kind: str, index: int, block: int) -> None:
        msgs = self.messages()
        if not 0 <= index < len(msgs):
            return
        msg = msgs[index]
        if kind == "copy":
            QApplication.clipboard().setText(msg.content)
            self.stats.setText("Message copied.")
        elif kind == "copy-code":
            blocks = code_blocks(msg.content)
            if 0 <= block < len(blocks):
                QApplication.clipboard().setText(blocks[block])
                self.stats.setText("Code copied.")
        elif kind == "edit" and msg.role == "user" and not self.client.generating:
            self.editing_position = msg.position
            self.composer.setPlainText(msg.content)
            self.composer.setFocus()
            self.notice.setText(
                "Editing a sent message: Send replaces it and the replies after it. Esc cancels."
            )
            self.notice.show()
        elif kind == "regen":
            self.regenerate()

    # ---- settings ------------------------------------------------------------------------
    def model_defaults(self) -> dict:
        vals = dict(GUI_DEFAULTS)
        info = self.client.info or {}
        for k, v in (info.get("defaults") or {}).items():
            vals[k] = -1 if (k == "seed" and v is None) else v
        return vals

    def reset_params(self) -> None:
        self.sampling.set_values(self.model_defaults())
        self._save_params(self.sampling.values(), clear=True)

    def _save_params(self, values: dict, clear: bool = False) -> None:
        if self.conv_id is not None:
            self.store.set_params(self.conv_id, {} if clear else values)

    def _save_system_prompt(self) -> None:
        if self.conv_id is None:
            return
        text = self.system_prompt.toPlainText()
        if text != self.store.conversation(self.conv_id).system_prompt:
            self.store.set_system_prompt(self.conv_id, text)
            self.client.count(self.chat_messages(), self.conv_id)

    def context_length(self) -> int:
        return int((self.client.info or {}).get("context_length") or 0) or 8192

    def _on_counted(self, conv_id: int, used: int) -> None:
        if conv_id == self.conv_id:  # an answer for a chat no longer shown is dropped
            self._set_context(used)

    def _set_context(self, used: int) -> None:
        self.context_used = used
        n = self.context_length()
        self.meter.setRange(0, n)
        self.meter.setValue(min(used, n))
        self.meter.setFormat(f"context {used:,} / {n:,}")
        self.meter.setToolTip(f"{used:,} of the model's {n:,}-token context are used")

    def _on_model_loaded(self, info: dict) -> None:
        self.transcript.assistant_name = str(info.get("name") or "Assistant")
        conv = self.store.conversation(self.conv_id) if self.conv_id else None
        if conv is not None and not conv.params:
            self.sampling.set_values(self.model_defaults())
        self._reload()
        self.client.count(self.chat_messages(), self.conv_id)

    def _update_buttons(self, *_: object) -> None:
        gen = self.client.generating
        has_model = self.client.info is not None
        self.send_btn.setVisible(not gen)
        self.stop_btn.setVisible(gen)
        self.send_btn.setEnabled(has_model and not self.client.loading)
        msgs = self.messages() if self.conv_id is not None else []
        self.regen_btn.setEnabled(has_model and not gen and bool(msgs))

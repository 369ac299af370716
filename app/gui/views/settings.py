"""Settings: theme, extra model folders, the default system prompt for new chats, HF token,
and the local API server's address, port and key (the toolbar's Serve switch uses them).

Values live in the store's settings table; the Hugging Face token goes to `engine.hub`'s
token file (never into the store or the logs).
"""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)


class SettingsView(QWidget):
    def __init__(self, window: Any) -> None:
        super().__init__()
        self.window = window
        store = window.store
        self.theme = QComboBox()
        self.theme.addItems(["system", "light", "dark"])
        self.theme.setCurrentText(store.setting("theme", "system"))
        self.theme.currentTextChanged.connect(self._set_theme)
        self.dirs = QListWidget()
        self.dirs.addItems(store.setting("extra_model_dirs", []))
        self.dirs.setMaximumHeight(110)
        add = QPushButton("Add folder…")
        add.clicked.connect(self._add_dir)
        rem = QPushButton("Remove")
        rem.clicked.connect(self._remove_dir)
        drow = QHBoxLayout()
        drow.addWidget(add)
        drow.addWidget(rem)
        drow.addStretch(1)
        dbox = QVBoxLayout()
        dbox.addWidget(self.dirs)
        dbox.addLayout(drow)
        self.system = QPlainTextEdit(store.setting("default_system_prompt", ""))
        self.system.setMaximumHeight(100)
        self.system.textChanged.connect(
            lambda: store.set_setting("default_system_prompt", self.system.toPlainText())
        )
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("hf_… (for gated models; stored with permissions 0600)")
        save = QPushButton("Save token")
        save.clicked.connect(self._save_token)
        trow = QHBoxLayout()
        trow.addWidget(self.token, 1)
        trow.addWidget(save)
        self.serve_host = QComboBox()
        self.serve_host.addItem("This computer only (127.0.0.1)", "127.0.0.1")
        self.serve_host.addItem("My network (0.0.0.0)", "0.0.0.0")
        host = store.setting("serve_host", "127.0.0.1")
        if self.serve_host.findData(host) < 0:
            self.serve_host.addItem(host, host)
        self.serve_host.setCurrentIndex(self.serve_host.findData(host))
        self.serve_host.currentIndexChanged.connect(self._set_host)
        self.serve_port = QSpinBox()
        self.serve_port.setRange(1, 65535)
        self.serve_port.setValue(int(store.setting("serve_port", 8080)))
        self.serve_port.valueChanged.connect(lambda v: store.set_setting("serve_port", int(v)))
        self.serve_key = QLineEdit(store.setting("serve_api_key", "") or "")
        self.serve_key.setEchoMode(QLineEdit.Password)
        self.serve_key.setPlaceholderText("API key (optional): clients send 'Bearer KEY'")
        self.serve_key.setToolTip("Changes apply the next time Serve is switched on")
        self.serve_key.textChanged.connect(lambda t: store.set_setting("serve_api_key", t.strip()))
        self.serve_warning = QLabel("")
        self.serve_warning.setWordWrap(True)
        self.serve_warning.setStyleSheet("color: #b3261e;")
        srow = QHBoxLayout()
        srow.addWidget(self.serve_host, 1)
        srow.addWidget(QLabel("port"))
        srow.addWidget(self.serve_port)
        sbox = QVBoxLayout()
        sbox.addLayout(srow)
        sbox.addWidget(self.serve_key)
        sbox.addWidget(self.serve_warning)
        self._show_host_warning()
        form = QFormLayout()
        form.addRow("Appearance", self.theme)
        form.addRow("Extra model folders", dbox)
        form.addRow("System prompt for new chats", self.system)
        form.addRow("Hugging Face token", trow)
        form.addRow("Local API server", sbox)
        title = QLabel("Settings")
        title.setStyleSheet("font-size: 15px; font-weight: 600;")
        self.note = QLabel("")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 8, 12, 8)
        lay.addWidget(title)
        box = QWidget()
        box.setMaximumWidth(820)
        box.setLayout(form)
        lay.addWidget(box)
        lay.addWidget(self.note)
        lay.addStretch(1)

    def _set_theme(self, mode: str) -> None:
        from PySide6.QtWidgets import QApplication

        from app.gui.theme import apply_theme

        self.window.store.set_setting("theme", mode)
        apply_theme(QApplication.instance(), mode)

    def _set_host(self, _index: int) -> None:
        self.window.store.set_setting("serve_host", self.serve_host.currentData())
        self._show_host_warning()

    def _show_host_warning(self) -> None:
        from app.gui.serving import is_loopback

        host = self.serve_host.currentData() or "127.0.0.1"
        self.serve_warning.setText(
            ""
            if is_loopback(host)
            else "Warning: any computer on your network will be able to use this model"
            " through the API. Set an API key, and serve only on networks you trust."
        )
        self.serve_warning.setVisible(not is_loopback(host))

    def _dirs(self) -> list[str]:
        return [self.dirs.item(i).text() for i in range(self.dirs.count())]

    def _add_dir(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Models folder")
        if d and d not in self._dirs():
            self.dirs.addItem(d)
            self.window.store.set_setting("extra_model_dirs", self._dirs())
            self.window.refresh_models()

    def _remove_dir(self) -> None:
        for item in self.dirs.selectedItems():
            self.dirs.takeItem(self.dirs.row(item))
        self.window.store.set_setting("extra_model_dirs", self._dirs())
        self.window.refresh_models()

    def _save_token(self) -> None:
        try:
            from engine.hub import save_token

            save_token(self.token.text().strip())
            self.token.clear()
            self.note.setText("Token saved.")
        except Exception as e:  # noqa: BLE001
            from app.gui.workers import error_text

            self.window.show_error(error_text(e))


def make_view(window: Any) -> QWidget:
    return SettingsView(window)

"""Settings: theme, extra model folders, the default system prompt for new chats, HF token.

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
        form = QFormLayout()
        form.addRow("Appearance", self.theme)
        form.addRow("Extra model folders", dbox)
        form.addRow("System prompt for new chats", self.system)
        form.addRow("Hugging Face token", trow)
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

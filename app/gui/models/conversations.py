"""The conversation list as a Qt list model over `app.store.Store` (no widgets here).

Rows are conversations, most recent first, filtered by a search string that matches titles
and message text. `UserRole` is the conversation id.
"""

from __future__ import annotations

import time

from PySide6.QtCore import QAbstractListModel, QModelIndex, Qt

from app.store import Conversation, Store


class ConversationListModel(QAbstractListModel):
    def __init__(self, store: Store, parent=None) -> None:
        super().__init__(parent)
        self.store = store
        self.search = ""
        self._rows: list[Conversation] = []
        self.refresh()

    def refresh(self, search: str | None = None) -> None:
        if search is not None:
            self.search = search
        self.beginResetModel()
        self._rows = self.store.conversations(self.search)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self._rows)

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid() or index.row() >= len(self._rows):
            return None
        conv = self._rows[index.row()]
        if role in (Qt.DisplayRole, Qt.EditRole):
            return conv.title
        if role == Qt.UserRole:
            return conv.id
        if role == Qt.ToolTipRole:
            return f"{conv.title}\nupdated {time.strftime('%Y-%m-%d %H:%M', time.localtime(conv.updated))}"
        return None

    def flags(self, index: QModelIndex) -> Qt.ItemFlags:
        base = super().flags(index)
        return base | Qt.ItemIsEditable if index.isValid() else base

    def setData(self, index: QModelIndex, value, role: int = Qt.EditRole) -> bool:  # noqa: N802
        if role != Qt.EditRole or not index.isValid() or not str(value).strip():
            return False
        self.store.rename(self._rows[index.row()].id, str(value))
        self._rows[index.row()] = self.store.conversation(self._rows[index.row()].id)
        self.dataChanged.emit(index, index)
        return True

    def id_at(self, row: int) -> int | None:
        return self._rows[row].id if 0 <= row < len(self._rows) else None

    def row_of(self, conv_id: int) -> int:
        for i, c in enumerate(self._rows):
            if c.id == conv_id:
                return i
        return -1

    def ids(self) -> list[int]:
        return [c.id for c in self._rows]

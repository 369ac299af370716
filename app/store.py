"""Conversations, messages and settings in one SQLite file (WAL mode, atomic writes).

Every public write runs in one transaction (`with self._conn:`), so a crash or an exception
half-way leaves the database as it was before the call. The store knows nothing about Qt or
the engine: messages are plain role/content pairs plus an optional JSON `stats` dict.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    UNIQUE (conversation_id, position)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str = ""
    params: dict = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass
class Message:
    id: int
    conversation_id: int
    position: int
    role: str
    content: str
    stats: dict = field(default_factory=dict)


class Store:
    """One connection per store; use it from one thread (the GUI thread)."""

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            from engine.paths import chats_db

            path = chats_db()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10)
        self._conn.isolation_level = "DEFERRED"  # explicit transactions via `with conn`
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._conn:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def journal_mode(self) -> str:
        return self._conn.execute("PRAGMA journal_mode").fetchone()[0]

    # ---- conversations -------------------------------------------------------------------
    def create_conversation(
        self, title: str = "New chat", system_prompt: str = "", params: dict | None = None
    ) -> Conversation:
        now = time.time()
        with self._conn:
            cur = self._conn.execute(
                "INSERT INTO conversations (title, system_prompt, params, created, updated)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, system_prompt, json.dumps(params or {}), now, now),
            )
        return self.conversation(int(cur.lastrowid))

    def conversation(self, conv_id: int) -> Conversation:
        row = self._conn.execute(
            "SELECT id, title, system_prompt, params, created, updated FROM conversations"
            " WHERE id = ?",
            (conv_id,),
        ).fetchone()
        if row is None:
            raise KeyError(f"conversation {conv_id} does not exist")
        return _conv(row)

    def conversations(self, search: str = "") -> list[Conversation]:
        """Most recently updated first; `search` matches titles and message text."""
        sql = "SELECT id, title, system_prompt, params, created, updated FROM conversations"
        args: tuple = ()
        if search.strip():
            like = f"%{search.strip()}%"
            sql += (
                " WHERE title LIKE ? OR id IN"
                " (SELECT conversation_id FROM messages WHERE content LIKE ?)"
            )
            args = (like, like)
        sql += " ORDER BY updated DESC, id DESC"
        return [_conv(r) for r in self._conn.execute(sql, args).fetchall()]

    def rename(self, conv_id: int, title: str) -> None:
        self._update_conv(conv_id, title=title.strip() or "Untitled")

    def set_system_prompt(self, conv_id: int, text: str) -> None:
        self._update_conv(conv_id, system_prompt=text, touch=False)

    def set_params(self, conv_id: int, params: dict) -> None:
        self._update_conv(conv_id, params=json.dumps(params), touch=False)

    def delete_conversation(self, conv_id: int) -> None:
        with self._conn:
            self._conn.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))

    def _update_conv(self, conv_id: int, touch: bool = True, **cols: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        vals = list(cols.values())
        if touch:
            sets += ", updated = ?"
            vals.append(time.time())
        with self._conn:
            self._conn.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*vals, conv_id))

    # ---- messages ------------------------------------------------------------------------
    def messages(self, conv_id: int) -> list[Message]:
        rows = self._conn.execute(
            "SELECT id, conversation_id, position, role, content, stats FROM messages"
            " WHERE conversation_id = ? ORDER BY position",
            (conv_id,),
        ).fetchall()
        return [Message(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def add_message(
        self, conv_id: int, role: str, content: str, stats: dict | None = None
    ) -> Message:
        return self.replace_from(conv_id, None, [(role, content, stats)])[0]

    def replace_from(
        self,
        conv_id: int,
        position: int | None,
        new: Iterable[tuple[str, str, dict | None]] = (),
    ) -> list[Message]:
        """Delete messages at `position` and after (None: keep all), then append `new`.

        One transaction: edit-and-resend and regenerate never leave a half-cut history.
        """
        now = time.time()
        added: list[int] = []
        with self._conn:
            if position is not None:
                self._conn.execute(
                    "DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                    (conv_id, position),
                )
            (last,) = self._conn.execute(
                "SELECT COALESCE(MAX(position), -1) FROM messages WHERE conversation_id = ?",
                (conv_id,),
            ).fetchone()
            for i, (role, content, stats) in enumerate(new):
                cur = self._conn.execute(
                    "INSERT INTO messages (conversation_id, position, role, content, stats, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (conv_id, last + 1 + i, role, content, json.dumps(stats or {}), now),
                )
                added.append(int(cur.lastrowid))
            self._conn.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))
        by_id = {m.id: m for m in self.messages(conv_id)}
        return [by_id[i] for i in added]

    def update_message(self, msg_id: int, content: str, stats: dict | None = None) -> None:
        with self._conn:
            if stats is None:
                self._conn.execute(
                    "UPDATE messages SET content = ? WHERE id = ?", (content, msg_id)
                )
            else:
                self._conn.execute(
                    "UPDATE messages SET content = ?, stats = ? WHERE id = ?",
                    (content, json.dumps(stats), msg_id),
                )

    # ---- settings ------------------------------------------------------------------------
    def setting(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )


def _conv(row: tuple) -> Conversation:
    return Conversation(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

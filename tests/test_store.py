"""The chat store: WAL mode, history restored by a new connection, atomic multi-step writes
(a failing edit leaves the old history whole), search over titles and text, cascade delete."""

from __future__ import annotations

import sqlite3

import pytest

from app.store import Store


def test_wal_mode_and_restore(tmp_path):
    db = tmp_path / "chats.sqlite"
    s = Store(db)
    assert s.journal_mode() == "wal"
    conv = s.create_conversation("Trip", system_prompt="Be brief.", params={"temperature": 0.3})
    s.add_message(conv.id, "user", "Where to?")
    s.add_message(conv.id, "assistant", "Lisbon.", {"decode_tps": 12.5})
    s.set_setting("theme", "dark")
    s.close()
    # an independent reader (plain sqlite3) sees the committed rows
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    raw.close()
    s2 = Store(db)
    (c,) = s2.conversations()
    assert (c.title, c.system_prompt, c.params) == ("Trip", "Be brief.", {"temperature": 0.3})
    msgs = s2.messages(c.id)
    assert [(m.role, m.content, m.position) for m in msgs] == [
        ("user", "Where to?", 0),
        ("assistant", "Lisbon.", 1),
    ]
    assert msgs[1].stats == {"decode_tps": 12.5}
    assert s2.setting("theme") == "dark" and s2.setting("missing", 7) == 7


def test_replace_from_is_atomic(tmp_path):
    s = Store(tmp_path / "c.sqlite")
    conv = s.create_conversation()
    for i, role in enumerate(["user", "assistant", "user", "assistant"]):
        s.add_message(conv.id, role, f"m{i}")
    before = [(m.role, m.content) for m in s.messages(conv.id)]
    # the second new row violates the role CHECK: the delete and first insert must roll back
    with pytest.raises(sqlite3.IntegrityError):
        s.replace_from(conv.id, 2, [("user", "edited", None), ("robot", "x", None)])
    assert [(m.role, m.content) for m in s.messages(conv.id)] == before
    s.replace_from(conv.id, 2, [("user", "edited", None)])
    assert [m.content for m in s.messages(conv.id)] == ["m0", "m1", "edited"]
    assert [m.position for m in s.messages(conv.id)] == [0, 1, 2]


def test_search_rename_delete_cascade(tmp_path):
    s = Store(tmp_path / "c.sqlite")
    a = s.create_conversation("Cooking")
    b = s.create_conversation("Work")
    s.add_message(b.id, "user", "the quarterly report on pasta sales")
    assert {c.id for c in s.conversations("pasta")} == {b.id}
    assert {c.id for c in s.conversations("cook")} == {a.id}
    s.rename(a.id, "  ")
    assert s.conversation(a.id).title == "Untitled"
    s.delete_conversation(b.id)
    assert [c.id for c in s.conversations()] == [a.id]
    n = s._conn.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (b.id,))
    assert n.fetchone()[0] == 0
    with pytest.raises(KeyError):
        s.conversation(b.id)

"""The chat view end to end, offscreen, over a fake engine that streams canned tokens:
sending streams text into the transcript; Stop (Esc) ends the reply within one token;
Regenerate and Edit replace the right messages and send the right history; the system prompt
and sampling settings reach the engine; history survives a new window on the same database;
the context limit is shown; engine errors land in a banner and the app stays usable; the
incremental streaming render shows exactly what a full render shows."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine, make_window
from PySide6.QtCore import Qt

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    """Chats, settings, downloads and adapters go to a temp LATENT_HOME, never the user's."""
    return latent_home


def send(qtbot, win, text: str, wait: bool = True) -> None:
    win.chat.composer.setPlainText(text)
    if wait:
        with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
            win.chat.send()
    else:
        win.chat.send()


def contents(win) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in win.chat.messages()]


def test_send_streams_into_view(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(delay=0.03))
    send(qtbot, win, "hello there", wait=False)
    # mid-reply: some text is shown, the reply is not finished
    qtbot.waitUntil(lambda: "Reply 1: Here is" in win.chat.transcript.toPlainText(), timeout=5000)
    assert win.client.generating and win.chat.stop_btn.isVisible()
    assert len(win.chat.messages()) == 1
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000) as sig:
        pass
    full = "Reply 1: Here is a short answer.\n\n```python\nprint('hi')\n```\nDone."
    assert contents(win) == [("user", "hello there"), ("assistant", full)]
    shown = win.chat.transcript.toPlainText()
    assert "print('hi')" in shown and "Done." in shown and "Copy code" in shown
    assert sig.args[0]["finish_reason"] == "stop"
    assert "tok/s" in win.chat.stats.text() and "first token" in win.chat.stats.text()
    assert win.chat.meter.value() == win.engine.count_tokens(win.chat.chat_messages())
    assert win.chat.title.text() == "hello there"
    win.shutdown()


def test_stop_ends_reply_within_one_token(qtbot, tmp_path):
    eng = FakeEngine(delay=0.05, tokens=[f" w{i}" for i in range(60)])
    win = make_window(qtbot, tmp_path / "c.sqlite", eng)
    send(qtbot, win, "count", wait=False)
    qtbot.waitUntil(lambda: win.chat.tokens_seen >= 4, timeout=5000)
    with qtbot.waitSignal(win.chat.reply_finished, timeout=5000) as sig:
        qtbot.keyClick(win.chat.composer, Qt.Key_Escape)
    # the engine produced at most the token it was working on when Esc was pressed...
    assert 4 <= eng.yielded_at_cancel <= eng.yielded <= eng.yielded_at_cancel + 1
    # ...and the view shows no more than the engine produced
    assert win.chat.tokens_seen <= eng.yielded
    assert sig.args[0]["finish_reason"] == "cancelled"
    (user, reply) = win.chat.messages()
    assert reply.role == "assistant" and reply.stats["finish_reason"] == "cancelled"
    assert reply.content == win.chat.stream_text and len(reply.content.split()) < 20
    assert not win.client.generating and win.chat.send_btn.isVisible()
    win.shutdown()


def test_regenerate_replaces_last_reply(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    send(qtbot, win, "first")
    send(qtbot, win, "second")
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        win.chat.transcript.action.emit("regen", 3, -1)  # the link under the last reply
    msgs = contents(win)
    assert [m[0] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1][1].startswith("Reply 1") and msgs[3][1].startswith("Reply 3")
    # the regenerated call saw the same history as the reply it replaced
    assert win.engine.calls[2] == win.engine.calls[1]
    win.shutdown()


def test_edit_replaces_message_and_later_replies(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    send(qtbot, win, "first")
    send(qtbot, win, "second")
    win.chat.transcript.action.emit("edit", 0, -1)  # "Edit" under the first message
    assert win.chat.composer.toPlainText() == "first"
    assert win.chat.notice.isVisible()
    send(qtbot, win, "first, edited")
    msgs = contents(win)
    assert [m[1][:7] for m in msgs] == ["first, ", "Reply 3"]
    assert win.engine.calls[-1] == [{"role": "user", "content": "first, edited"}]
    win.shutdown()


def test_system_prompt_and_sampling_reach_engine(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    # defaults come from the model's generation_defaults()
    assert win.chat.sampling.values()["temperature"] == pytest.approx(0.2)
    assert win.chat.sampling.values()["max_tokens"] == 256
    win.chat.system_prompt.setPlainText("You are a pirate.")
    win.chat.sampling.fields["temperature"].setValue(1.3)
    win.chat.sampling.fields["max_tokens"].setValue(5)
    win.chat.sampling.fields["seed"].setValue(42)
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000) as sig:
        send(qtbot, win, "ahoy", wait=False)
    assert win.engine.calls[-1][0] == {"role": "system", "content": "You are a pirate."}
    params = win.engine.params[-1]
    assert (params.temperature, params.max_tokens, params.seed) == (pytest.approx(1.3), 5, 42)
    assert sig.args[0]["finish_reason"] == "length"
    assert "hit max tokens" in win.chat.stats.text()
    conv = win.store.conversation(win.chat.conv_id)
    assert conv.system_prompt == "You are a pirate." and conv.params["temperature"] == 1.3
    win.shutdown()


def test_history_survives_new_window(qtbot, tmp_path):
    db = tmp_path / "c.sqlite"
    win = make_window(qtbot, db)
    send(qtbot, win, "remember me")
    first = win.chat.conv_id
    other = win.chat.new_conversation()
    win.chat.rename_conversation(other, "Empty one")
    win.shutdown()
    win.close()
    win2 = make_window(qtbot, db, load=False)
    titles = [
        win2.chat.list_model.data(win2.chat.list_model.index(r))
        for r in range(win2.chat.list_model.rowCount())
    ]
    assert set(titles) == {"remember me", "Empty one"}
    win2.chat.open_conversation(first)
    assert "Reply 1: Here is a short answer." in win2.chat.transcript.toPlainText()
    assert [m.role for m in win2.chat.messages()] == ["user", "assistant"]
    win2.shutdown()


def test_conversation_list_new_rename_delete_search(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    chat = win.chat
    send(qtbot, win, "about cats")
    qtbot.keyClick(win, Qt.Key_N, Qt.ControlModifier)  # Ctrl+N: a new, empty chat
    assert chat.messages() == [] and chat.list_model.rowCount() == 2
    send(qtbot, win, "about dogs")
    chat.rename_conversation(chat.conv_id, "Dogs")
    chat.search.setText("cats")
    assert chat.list_model.rowCount() == 1
    chat.search.setText("")
    assert chat.list_model.rowCount() == 2
    chat.delete_conversation(chat.conv_id)
    assert [c.title for c in win.store.conversations()] == ["about cats"]
    assert chat.conv_id == win.store.conversations()[0].id
    # the context meter follows the chat on screen (counted on the engine thread)
    expected = win.engine.count_tokens(chat.chat_messages())
    qtbot.waitUntil(lambda: chat.meter.value() == expected, timeout=5000)
    win.shutdown()


def test_enter_sends_shift_enter_newline(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    comp = win.chat.composer
    comp.setFocus()
    qtbot.keyClicks(comp, "line one")
    qtbot.keyClick(comp, Qt.Key_Return, Qt.ShiftModifier)
    qtbot.keyClicks(comp, "line two")
    assert comp.toPlainText() == "line one\nline two" and win.chat.messages() == []
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000):
        qtbot.keyClick(comp, Qt.Key_Return)
    assert contents(win)[0] == ("user", "line one\nline two")
    win.shutdown()


def test_context_limit_is_shown(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(context_length=12))
    with qtbot.waitSignal(win.chat.reply_finished, timeout=10000) as sig:
        send(qtbot, win, "hi", wait=False)
    assert sig.args[0]["finish_reason"] == "context"
    assert win.chat.notice.isVisible() and "context limit (12 tokens)" in win.chat.notice.text()
    assert win.chat.meter.maximum() == 12
    # the next message no longer fits: the engine refuses, a banner says so, the app goes on
    with qtbot.waitSignal(win.client.failed, timeout=5000):
        send(qtbot, win, "and more", wait=False)
    assert win.banner.isVisible() and "does not fit" in win.banner.text()
    win.shutdown()


def test_errors_show_banner_and_app_stays_usable(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", load=False)
    with qtbot.waitSignal(win.client.load_failed, timeout=5000):
        win.load_model("/models/broken.gguf")
    assert win.banner.isVisible() and "bad magic" in win.banner.text()
    assert not win.client.busy
    send(qtbot, win, "anyone there?", wait=False)  # no model: a banner, nothing sent
    assert "no model is loaded" in win.banner.text() and win.chat.messages() == []
    with qtbot.waitSignal(win.client.loaded, timeout=5000):
        win.load_model("/fake/good.gguf")
    win.engine.chat_error = MemoryError("out of memory")
    with qtbot.waitSignal(win.client.failed, timeout=5000):
        send(qtbot, win, "hello", wait=False)
    assert "MemoryError: out of memory" in win.banner.text()
    win.engine.chat_error = None
    send(qtbot, win, "hello again")
    assert contents(win)[-1][1].startswith("Reply")
    win.shutdown()


def test_copy_links_put_text_on_clipboard(qtbot, tmp_path):
    from PySide6.QtWidgets import QApplication

    win = make_window(qtbot, tmp_path / "c.sqlite")
    send(qtbot, win, "code please")
    win.chat.transcript.action.emit("copy-code", 1, 0)
    assert QApplication.clipboard().text() == "print('hi')"
    win.chat.transcript.action.emit("copy", 0, -1)
    assert QApplication.clipboard().text() == "code please"
    win.shutdown()


def test_toolbar_adapter_toggle_and_unload(qtbot, tmp_path, latent_home):
    from engine.paths import adapters_dir

    (adapters_dir() / "my-notes-lora").mkdir()
    win = make_window(qtbot, tmp_path / "c.sqlite")
    win.refresh_models()
    assert win.adapter_check.isEnabled() and win.adapter_combo.currentText() == "my-notes-lora"
    with qtbot.waitSignal(win.client.loaded, timeout=5000) as sig:
        win.adapter_check.setChecked(True)
    assert sig.args[0]["adapter"] == str(adapters_dir() / "my-notes-lora")
    assert "adapter my-notes-lora" in win.model_label.text()
    with qtbot.waitSignal(win.client.loaded, timeout=5000) as sig:
        win.adapter_check.setChecked(False)
    assert sig.args[0]["adapter"] is None
    with qtbot.waitSignal(win.client.unloaded, timeout=5000):
        win.unload_btn.click()
    assert win.client.info is None and win.engine.info() is None
    assert not win.chat.send_btn.isEnabled() and win.status.text() == "No model loaded"
    win.shutdown()


def test_delete_chat_while_it_streams(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(delay=0.05))
    first = win.chat.conv_id
    send(qtbot, win, "long answer please", wait=False)
    qtbot.waitUntil(lambda: win.chat.tokens_seen >= 2, timeout=5000)
    with qtbot.waitSignal(win.chat.reply_finished, timeout=5000):
        win.chat.delete_conversation(first)
    assert first not in [c.id for c in win.store.conversations()]
    assert not win.client.generating and win.chat.messages() == []
    send(qtbot, win, "still works?")  # the app carries on in the new chat
    assert contents(win)[-1][1].startswith("Reply 2")
    win.shutdown()


def test_new_chat_reuses_an_empty_one(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    first = win.chat.conv_id
    assert win.chat.new_conversation() == first  # still empty: no second blank chat
    send(qtbot, win, "hello")
    second = win.chat.new_conversation()
    assert second != first and len(win.store.conversations()) == 2
    win.shutdown()


def test_incremental_stream_render_matches_full_render(qtbot):
    from app.gui.widgets.transcript import Transcript

    t = Transcript()
    qtbot.addWidget(t)
    body = "Some **bold** text and a list:\n\n- a\n- b\n\n```python\nprint(1)\n```\n"
    t.set_messages([("user" if i % 2 == 0 else "assistant", f"{body}{i}", {}) for i in range(8)])
    t.begin_stream()
    for chunk in ("Partial ", "reply with `code` and\n\n```py\nx = 1", "\n```\nmore"):
        t.append_stream(chunk)
        t.render_stream()  # only the streaming bubble is replaced
        incremental = t.toPlainText()
        t.render()  # the whole document from scratch
        assert incremental == t.toPlainText()
    assert "x = 1" in t.toPlainText() and t.toPlainText().count("print(1)") == 8

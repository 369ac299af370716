"""The real engine behind the real window: the default model (SmolLM2-135M-Instruct) loads on
the engine thread and a greedy reply to a question appears in the transcript and the store; the
inspector shows its parameter table, its KV bytes per token (from the model's shape in
FACTS.md) and, for one prompt, causal attention maps and next-token probabilities. With the
Serve switch on, an OpenAI-client request returns the window's own greedy reply (both run on
the engine thread), and check-the-math on the real model is within tolerance."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.mark.skipif(
    importlib.util.find_spec("engine.session") is None, reason="engine.session has not landed yet"
)
def test_real_engine_reply_appears(qtbot, tmp_path, default_model_path, latent_home):
    from app.gui.main_window import MainWindow
    from app.store import Store

    win = MainWindow(store=Store(tmp_path / "c.sqlite"), autoload=False)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.client.loaded, timeout=120_000) as loaded:
        win.load_model(str(default_model_path))
    info = loaded.args[0]
    assert info["context_length"] == 8192 and "defaults" in info
    chat = win.chat
    chat.sampling.set_values({"temperature": 0.0, "max_tokens": 12, "seed": 0})
    chat.composer.setPlainText("What is the capital of France?")
    with qtbot.waitSignal(chat.reply_finished, timeout=300_000) as done:
        chat.send()
    stats = done.args[0]
    reply = chat.messages()[-1]
    assert reply.role == "assistant" and "Paris" in reply.content
    assert reply.content.strip()[:20] in chat.transcript.toPlainText()
    assert stats["generated_tokens"] >= 1 and stats["finish_reason"] in ("stop", "length")
    assert 0 < chat.meter.value() <= 8192
    # the inspector lists the real parameter table (30 layers of q/k/v/o/gate/up/down + norms)
    ins = win.views["inspector"]
    qtbot.waitUntil(lambda: ins.model.rowCount() > 0, timeout=30_000)
    names = [r[0] for r in ins.model.rows]
    assert sum(n.endswith("self_attn.q_proj.weight") for n in names) == 30
    # KV bytes per token from FACTS.md's shape: 2 (K, V) x 30 layers x 3 KV heads x 64 dims
    dtype_bytes = 2 if info["dtype"] in ("float16", "bfloat16") else 4
    assert f"{2 * 30 * 3 * 64 * dtype_bytes / 1000:.0f} KB per token" in ins.summary.text()
    # look at a prompt: 30 attention maps of 9 heads, each row a causal distribution
    panel = ins.look_panel
    panel.prompt.setText("The capital of France is")
    with qtbot.waitSignal(win.client.looked, timeout=60_000):
        panel.run()
    att, n = panel.result["attention"], len(panel.result["tokens"])
    assert len(att) == 30 and att[0].shape == (9, n, n)
    np.testing.assert_allclose(att[5].sum(-1), 1.0, atol=1e-3)
    assert np.abs(np.triu(att[5], 1)).max() < 1e-6  # no attention to later tokens
    assert panel.top.rowCount() == 10 and panel.image.image is not None
    win.shutdown()


@pytest.mark.skipif(
    importlib.util.find_spec("engine.session") is None, reason="engine.session has not landed yet"
)
def test_real_engine_serve_switch_and_check_math(qtbot, tmp_path, default_model_path, latent_home):
    """The Serve switch on the real model: an OpenAI-client request, generated on the window's
    engine thread (where MLX made the model's streams), returns the same greedy text the
    window's own chat produced for the same messages, with our tokenizer's prompt count; then the
    Inspector's check-the-math table ends within tolerance with its max-abs line."""
    import socket

    openai = pytest.importorskip("openai")
    from app.gui.main_window import MainWindow
    from app.store import Store

    win = MainWindow(store=Store(tmp_path / "c.sqlite"), autoload=False)
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.client.loaded, timeout=120_000):
        win.load_model(str(default_model_path))
    chat = win.chat
    chat.sampling.set_values({"temperature": 0.0, "max_tokens": 12, "seed": 0})
    chat.composer.setPlainText("Name a primary colour.")
    with qtbot.waitSignal(chat.reply_finished, timeout=300_000):
        chat.send()
    window_reply = chat.messages()[-1].content
    messages = chat.chat_messages()[:-1]  # what the window sent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    win.store.set_setting("serve_port", port)
    with qtbot.waitSignal(win.server.state_changed, timeout=10_000):
        win.set_serving(True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    out = client.chat.completions.create(
        model="default", messages=messages, temperature=0.0, max_tokens=12
    )
    assert out.choices[0].message.content == window_reply
    assert out.usage.prompt_tokens == win.client.worker.engine.count_tokens(messages)
    with qtbot.waitSignal(win.server.state_changed, timeout=10_000):
        win.set_serving(False)
    panel = win.views["inspector"].math_panel
    panel.prompt.setText("The capital of France is")
    with qtbot.waitSignal(win.client.checked, timeout=180_000) as sig:
        panel.run()
    result = sig.args[0]
    assert "error" not in result, result
    assert result["ok"] and len(result["rows"]) == 30 + 3  # embeddings, 30 layers, norm, logits
    assert f"max abs difference: {result['max_abs']:.6e}" in panel.summary.text()
    win.shutdown()

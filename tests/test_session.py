"""`Engine`, the session API: prompt-prefix reuse, cancel from another thread, defaults, limits.

A tiny random llama with SmolLM2's real tokenizer and chat template (from the default GGUF)
keeps it fast. Reuse is checked against a cold Engine: the second turn of a conversation
must prefill only its new tokens (`stats.cached_tokens`) and still give exactly the tokens a
fresh engine gives; alternating two conversations keeps both warm (LRU), and a conversation
sharing only the system prompt does not destroy the other's cache.
"""

from __future__ import annotations

import json
import threading
import time

import mlx.core as mx
import pytest

from engine.errors import ContextLengthError, LatentError
from engine.loading import LoadedModel, ModelInfo
from engine.models import get_model_classes
from engine.sampling import SamplingParams
from engine.session import Engine, common_prefix_len

CTX = 384


@pytest.fixture(scope="module")
def tiny_loaded(default_model_path, tmp_path_factory):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_path(default_model_path)
    Model, Args = get_model_classes("llama")
    config = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tok.vocab_size,
        max_position_embeddings=CTX,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    mx.random.seed(1)
    model = Model(Args.from_dict(config))
    mx.eval(model.parameters())
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_p": 0.9, "top_k": 20, "max_new_tokens": 77})
    )
    info = ModelInfo("tiny", str(folder), "llama", 0, 0, CTX, None, None, "float32")
    return LoadedModel(model, tok, config, folder, info)


def _engine(loaded) -> Engine:
    e = Engine()
    e.attach(loaded)
    return e


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _reply(engine, messages, params=GREEDY):
    events = list(engine.chat(messages, params))
    return "".join(e.text for e in events), [e.token_id for e in events], events[-1].stats


def test_turn_two_reuses_prefix_and_matches_cold(tiny_loaded):
    warm = _engine(tiny_loaded)
    m1 = [{"role": "user", "content": "Tell me about the sea."}]
    text1, _, st1 = _reply(warm, m1)
    assert st1.cached_tokens == 0
    m2 = m1 + [
        {"role": "assistant", "content": text1},
        {"role": "user", "content": "And the mountains?"},
    ]
    _, toks_warm, st2 = _reply(warm, m2)
    n1 = warm.count_tokens(m1)
    assert st2.cached_tokens >= n1
    assert st2.prompt_tokens == warm.count_tokens(m2)
    _, toks_cold, st_cold = _reply(_engine(tiny_loaded), m2)
    assert st_cold.cached_tokens == 0
    assert toks_warm == toks_cold


def test_same_prompt_twice_reuses_all_but_one(tiny_loaded):
    e = _engine(tiny_loaded)
    m = [{"role": "user", "content": "hello"}]
    _, a, _ = _reply(e, m)
    _, b, st = _reply(e, m)
    assert a == b
    assert st.cached_tokens == st.prompt_tokens - 1


def test_two_conversations_stay_warm(tiny_loaded):
    e = _engine(tiny_loaded)
    sys_msg = {"role": "system", "content": "You are terse."}
    a = [sys_msg, {"role": "user", "content": "Conversation A is about cooking pasta at home."}]
    b = [sys_msg, {"role": "user", "content": "Conversation B is about repairing bicycles."}]
    _reply(e, a)
    _, _, st_b = _reply(e, b)
    # B shares only the system prompt with A: A's cache is forked, not destroyed.
    assert 0 < st_b.cached_tokens < e.count_tokens(a)
    _, _, st_a = _reply(e, a)
    assert st_a.cached_tokens == e.count_tokens(a) - 1
    assert len(e.prefix_cache.entries) >= 2


def test_prefix_cache_is_bounded_by_memory(tiny_loaded):
    e = Engine(prefix_cache_bytes=1)
    e.attach(tiny_loaded)
    for i in range(3):
        _reply(e, [{"role": "user", "content": f"topic number {i} " * 3}])
    assert len(e.prefix_cache.entries) == 1  # only the most recent survives the budget


def test_cancel_from_another_thread(tiny_loaded):
    e = _engine(tiny_loaded)
    events = []
    got_three = threading.Event()

    def consume():
        for ev in e.chat([{"role": "user", "content": "count"}], SamplingParams(max_tokens=300)):
            events.append(ev)
            if len(events) == 3:
                got_three.set()
                time.sleep(0.05)  # the cancel lands while this token is being handled

    t = threading.Thread(target=consume)
    t.start()
    assert got_three.wait(30)
    e.cancel()
    t.join(30)
    assert events[-1].done and events[-1].stats.finish_reason == "cancelled"
    assert events[-1].stats.generated_tokens <= 4


def test_context_error_names_both_numbers(tiny_loaded):
    e = _engine(tiny_loaded)
    long = [{"role": "user", "content": "word " * (CTX + 10)}]
    n = e.count_tokens(long)
    with pytest.raises(ContextLengthError, match=rf"{n}.*{CTX}"):
        e.chat(long, GREEDY)


def test_generation_defaults_from_generation_config(tiny_loaded):
    p = _engine(tiny_loaded).generation_defaults()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.3, 0.9, 20, 77)


def test_no_model_is_a_user_error():
    with pytest.raises(LatentError):
        Engine().chat([{"role": "user", "content": "hi"}])


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2

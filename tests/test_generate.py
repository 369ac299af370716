"""The generation loop on a tiny random llama: every stopping rule and the cached fast path.

References are independent of the code under test: a no-cache full-forward greedy loop for
the tokens, and an unrestricted run of the same model for what stop strings / EOS / limits
must cut. Covers: cached decoding = recomputing everything, chunked prefill = one pass, stop
strings never leak (not even a partial prefix), EOS stops, max tokens, the context limit
(error with both numbers; "context" finish), seed determinism, cancel within one token, and
prompt-prefix reuse giving the same tokens as a cold run.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from toy_tokenizer import EOS, PIECES, VOCAB
from toy_tokenizer import ToyTokenizer as _Tok

from engine.errors import ContextLengthError
from engine.generate import _StopScanner, generate_step, stream_generate
from engine.models import get_model_classes
from engine.sampling import SamplingParams

CTX = 96


@pytest.fixture(scope="module")
def loaded():
    Model, Args = get_model_classes("llama")
    args = Args.from_dict(
        dict(
            model_type="llama",
            hidden_size=48,
            num_hidden_layers=2,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=CTX,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    mx.random.seed(0)
    model = Model(args)
    # Sharper logits than the default init so greedy paths are far from ties.
    model.lm_head.weight = model.lm_head.weight * 8
    mx.eval(model.parameters())
    info = SimpleNamespace(context_length=CTX)
    return SimpleNamespace(model=model, tokenizer=_Tok(), config={}, path=None, info=info)


PROMPT = [5, 17, 3, 40, 22, 9, 31, 12, 7, 50, 2]


def _reference_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(mx.array(ids)[None])[0, -1]
        ids.append(int(mx.argmax(logits).item()))
    return ids[len(prompt) :]


def _run(loaded, prompt=PROMPT, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 24), **kw)
    events = list(stream_generate(loaded, prompt, params))
    return events, [e.token_id for e in events if not e.done], "".join(e.text for e in events)


def test_cached_decoding_matches_full_recompute(loaded):
    ref = _reference_greedy(loaded.model, PROMPT, 16)
    got = [
        t for t, _ in generate_step(loaded.model, PROMPT, loaded.model.make_cache(), max_tokens=16)
    ]
    assert got == ref


def test_chunked_prefill_equals_one_pass(loaded):
    a = list(
        generate_step(
            loaded.model, PROMPT, loaded.model.make_cache(), prefill_chunk=3, max_tokens=8
        )
    )
    b = list(
        generate_step(
            loaded.model, PROMPT, loaded.model.make_cache(), prefill_chunk=512, max_tokens=8
        )
    )
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, la), (_, lb) in zip(a, b, strict=True):
        np.testing.assert_allclose(np.array(la), np.array(lb), atol=1e-4)


def test_stop_string_cuts_exactly_and_never_leaks(loaded):
    _, _, full = _run(loaded, max_tokens=40)
    assert len(full) > 12
    for start, length in [(6, 3), (10, 5), (len(full) // 2, 2)]:
        stop = full[start : start + length]
        expected = full[: full.find(stop)]
        events, _, text = _run(loaded, max_tokens=40, stop=[stop])
        assert text == expected
        assert events[-1].stats.finish_reason == "stop"
        # Streaming never showed text past the cut, not even transiently.
        shown = ""
        for e in events:
            shown += e.text
            assert expected.startswith(shown)


def test_stop_scanner_holds_back_partial_prefix():
    s = _StopScanner(["</end>"])
    assert s.feed("hello </e") == ("hello ", False)
    assert s.feed("nd") == ("", False)
    assert s.feed("> tail") == ("", True)
    s = _StopScanner(["</end>"])
    assert s.feed("a </e") == ("a ", False)
    assert s.feed("x") == ("</ex", False)
    assert s.flush() == ""


def test_eos_stops(loaded):
    _, toks, _ = _run(loaded, max_tokens=30)
    k = 7
    eos_tok = toks[k]
    first = toks.index(eos_tok)
    loaded.tokenizer.eos_ids = {eos_tok}
    try:
        events, got, text = _run(loaded, max_tokens=30)
    finally:
        loaded.tokenizer.eos_ids = {EOS}
    assert got == toks[:first]
    assert text == "".join(PIECES[t] for t in toks[:first])
    assert events[-1].stats.finish_reason == "stop"
    assert events[-1].stats.generated_tokens == first + 1  # the EOS token itself counts


def test_max_tokens(loaded):
    events, toks, _ = _run(loaded, max_tokens=5)
    assert len(toks) == 5
    st = events[-1].stats
    assert (
        st.finish_reason == "length"
        and st.generated_tokens == 5
        and st.prompt_tokens == len(PROMPT)
    )


def test_context_limit(loaded):
    with pytest.raises(ContextLengthError, match=rf"{CTX + 4}.*{CTX}"):
        stream_generate(loaded, list(range(1, 5)) * (CTX // 4 + 1), SamplingParams())
    prompt = (PROMPT * 9)[: CTX - 6]
    events, toks, _ = _run(loaded, prompt=prompt, max_tokens=100)
    assert len(toks) == 6
    assert events[-1].stats.finish_reason == "context"


def test_seed_determinism(loaded):
    def run(seed):
        p = SamplingParams(temperature=1.5, seed=seed, max_tokens=20)
        return [e.token_id for e in stream_generate(loaded, PROMPT, p) if not e.done]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_cancel_ends_within_one_token(loaded):
    flag = threading.Event()
    events = []
    for ev in stream_generate(
        loaded, PROMPT, SamplingParams(temperature=0.0, max_tokens=50), cancel=flag
    ):
        events.append(ev)
        if len(events) == 3:
            flag.set()
    assert len(events) == 4
    assert events[-1].done and events[-1].stats.finish_reason == "cancelled"
    assert events[-1].stats.generated_tokens == 3


def test_prefix_reuse_matches_cold_run(loaded):
    cache = loaded.model.make_cache()
    first = [
        e.token_id
        for e in stream_generate(
            loaded, PROMPT, SamplingParams(temperature=0.0, max_tokens=6), cache=cache
        )
        if not e.done
    ]
    # Turn 2: the previous prompt + reply + new user tokens. The cache holds a prefix of it.
    turn2 = PROMPT + first + [11, 19, 23]
    held = cache[0].offset
    assert held >= len(PROMPT)
    for c in cache:
        c.trim(c.offset - len(PROMPT) - 4)
    warm = list(
        stream_generate(
            loaded,
            turn2,
            SamplingParams(temperature=0.0, max_tokens=10),
            cache=cache,
            num_cached=len(PROMPT) + 4,
        )
    )
    cold = list(stream_generate(loaded, turn2, SamplingParams(temperature=0.0, max_tokens=10)))
    assert [e.token_id for e in warm] == [e.token_id for e in cold]
    assert warm[-1].stats.cached_tokens == len(PROMPT) + 4


def test_stats_are_filled(loaded):
    events, _, _ = _run(loaded, max_tokens=8)
    st = events[-1].stats
    assert st.ttft_s > 0 and st.prefill_tps > 0 and st.decode_tps > 0
    assert st.peak_memory_bytes > 0

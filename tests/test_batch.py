"""Batched decoding (engine/batch.py) against requests decoded alone with `stream_generate`.

The reference is independent of the code under test: each request run by itself through the
ordinary generation loop. Proves, on a tiny quantized llama (fast) and on SmolLM2 (slow):
greedy rows of different lengths that join at different steps get bit-identical events (text,
token ids, log-probabilities) to their lone runs; so do rows with seeded sampling, penalties,
logit bias, stop strings, EOS, max tokens and the context limit, each finishing on its own; a
cancelled row ends "cancelled" without touching the others; requests beyond the batch size
wait and then join; the prefix cache is lent and returned; the exactness probe caps the batch
where a layer's arithmetic changes with the row count; other families are refused by name.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from toy_tokenizer import EOS, VOCAB
from toy_tokenizer import ToyTokenizer as _Tok

from engine.batch import BatchGenerator, batch_unsupported, exact_rows
from engine.errors import ContextLengthError, LatentError
from engine.generate import stream_generate
from engine.models import get_model_classes
from engine.sampling import SamplingParams
from engine.session import PrefixCache

CTX = 96


def _tiny_llama(seed: int = 0, **overrides):
    Model, Args = get_model_classes("llama")
    args = Args.from_dict(
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=CTX,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
        | overrides
    )
    mx.random.seed(seed)
    model = Model(args)
    model.lm_head.weight = model.lm_head.weight * 8  # sharp logits: greedy far from ties
    nn.quantize(model, group_size=32, bits=4)  # the quantized layers real models decode with
    mx.eval(model.parameters())
    return SimpleNamespace(
        model=model,
        tokenizer=_Tok(),
        config={},
        path=None,
        info=SimpleNamespace(context_length=CTX),
    )


@pytest.fixture(scope="module")
def loaded():
    return _tiny_llama()


def _prompt(n: int, salt: int) -> list[int]:
    return [(i * 13 + salt * 7 + 1) % 60 for i in range(n)]


def _key(events) -> list:
    return [
        (e.text, e.token_id, e.done, e.logprob, e.top_logprobs)
        + ((e.stats.finish_reason, e.stats.generated_tokens) if e.done else ())
        for e in events
    ]


def _alone(loaded, prompt, params) -> list:
    return _key(stream_generate(loaded, prompt, params))


def _batched(batch: BatchGenerator, requests, join_at=None, cancel_at=None) -> dict[int, list]:
    """Run `requests` [(prompt, params)] through `batch`; request i is submitted before step
    `join_at[i]`; `cancel_at` {i: step} sets request i's cancel flag before that step."""
    join_at = join_at or [0] * len(requests)
    cancel_at = cancel_at or {}
    flags = [threading.Event() for _ in requests]
    uid_of, events, step = {}, {}, 0
    while step <= max(join_at) or not batch.idle:
        for i, (prompt, params) in enumerate(requests):
            if join_at[i] == step:
                uid_of[batch.submit(prompt, params, flags[i])] = i
            if cancel_at.get(i) == step:
                flags[i].set()
        for uid, ev in batch.step():
            events.setdefault(uid_of[uid], []).append(ev)
        step += 1
        assert step < 1000
    return {i: _key(evs) for i, evs in events.items()}


def test_greedy_rows_joining_at_different_steps_equal_lone_runs(loaded):
    requests = [
        (_prompt(n, salt), SamplingParams(temperature=0.0, max_tokens=m, logprobs=2))
        for n, salt, m in [(11, 0, 20), (3, 1, 9), (30, 2, 25), (1, 3, 14), (17, 4, 3)]
    ]
    batch = BatchGenerator(loaded)
    got = _batched(batch, requests, join_at=[0, 0, 4, 6, 6])
    assert batch.peak_rows >= 4  # the rows really shared forward passes
    for i, (prompt, params) in enumerate(requests):
        assert got[i] == _alone(loaded, prompt, params), f"request {i}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 24},
        {"sliding_window": 8},
        {"qk_norm": True, "attention_bias": True},
    ],
    ids=["dynamic-rope", "sliding-window", "qk-norm-bias"],
)
def test_llama_variants_batch_exactly(overrides):
    variant = _tiny_llama(seed=2, **overrides)
    requests = [
        (_prompt(n, salt), SamplingParams(temperature=0.0, max_tokens=m))
        for n, salt, m in [(30, 0, 20), (5, 1, 30), (14, 2, 12)]
    ]
    got = _batched(BatchGenerator(variant), requests, join_at=[0, 2, 2])
    for i, request in enumerate(requests):
        assert got[i] == _alone(variant, *request), f"request {i}"


def test_every_sampling_rule_stays_with_its_row(loaded):
    lone = _alone(loaded, _prompt(9, 0), SamplingParams(temperature=0.0, max_tokens=40))
    full = "".join(text for text, *_ in lone)
    stop = full[8:11]
    eos_after = [t for _, t, *_ in lone if t is not None][7]
    rules = [
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=3, max_tokens=30),
        SamplingParams(temperature=1.3, seed=-11, max_tokens=30, logprobs=1),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=30),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7, max_tokens=30),
        SamplingParams(temperature=0.0, logit_bias={7: 5.0, 12: -100.0}, max_tokens=30),
        SamplingParams(temperature=0.0, stop=[stop], max_tokens=40),
        SamplingParams(temperature=0.0, max_tokens=200),  # runs into the context
    ]
    prompts = [_prompt(9, 0) if i == 5 else _prompt(9 + i, i + 1) for i in range(len(rules))]
    prompts[-1] = _prompt(CTX - 12, 6)
    requests = list(zip(prompts, rules))
    got = _batched(BatchGenerator(loaded), requests, join_at=[0, 1, 2, 3, 0, 1, 2])
    for i, (prompt, params) in enumerate(requests):
        assert got[i] == _alone(loaded, prompt, params), f"rule {i}: {params}"
    assert got[5][-1][-2] == "stop" and stop not in "".join(t for t, *_ in got[5])
    assert got[6][-1][-2] == "context"

    # EOS ends one row while its neighbour goes on.
    loaded.tokenizer.eos_ids = {eos_after}
    try:
        pair = [(_prompt(9, 0), SamplingParams(temperature=0.0, max_tokens=40))] * 2
        pair[1] = (_prompt(20, 9), pair[1][1])
        got = _batched(BatchGenerator(loaded), pair)
        for i, (prompt, params) in enumerate(pair):
            assert got[i] == _alone(loaded, prompt, params)
        assert got[0][-1][-2] == "stop"
    finally:
        loaded.tokenizer.eos_ids = {EOS}


def test_cancelled_row_ends_alone(loaded):
    params = SamplingParams(temperature=0.0, max_tokens=30)
    requests = [(_prompt(12, s), params) for s in range(3)]
    got = _batched(BatchGenerator(loaded), requests, cancel_at={1: 5})
    assert got[1][-1][-2] == "cancelled"
    assert 0 < got[1][-1][-1] < 30
    lone = _alone(loaded, *requests[1])
    assert got[1][:-1] == lone[: len(got[1]) - 1]  # what it sent before the cancel was right
    for i in (0, 2):
        assert got[i] == _alone(loaded, *requests[i])


def test_requests_beyond_the_batch_size_wait_their_turn(loaded):
    params = SamplingParams(temperature=0.0, max_tokens=6)
    requests = [(_prompt(5 + i, i), params) for i in range(5)]
    batch = BatchGenerator(loaded, max_batch=2)
    got = _batched(batch, requests)
    assert batch.peak_rows == 2
    for i, request in enumerate(requests):
        assert got[i] == _alone(loaded, *request)


def test_prefix_cache_is_lent_and_returned(loaded):
    cache = PrefixCache()
    batch = BatchGenerator(loaded, prefix_cache=cache)
    first = (_prompt(20, 1), SamplingParams(temperature=0.0, max_tokens=5))
    _batched(batch, [first])
    assert len(cache.entries) == 1
    # Turn two extends turn one: only the new tokens are prefilled, and the reply is unchanged.
    turn_two = _prompt(20, 1) + [t for _, t, *_ in _alone(loaded, *first) if t is not None] + [9]
    uid = batch.submit(turn_two, SamplingParams(temperature=0.0, max_tokens=8))
    events = []
    while not batch.idle:
        events += [ev for u, ev in batch.step() if u == uid]
    assert events[-1].stats.cached_tokens >= 20
    got = [e.token_id for e in events if not e.done]
    lone = [
        t for _, t, *_ in _alone(loaded, turn_two, SamplingParams(temperature=0.0, max_tokens=8))
    ]
    assert got == [t for t in lone if t is not None]


def test_prompts_that_cannot_be_served_fail_at_submit(loaded):
    batch = BatchGenerator(loaded)
    with pytest.raises(ContextLengthError, match=rf"{CTX}.*{CTX}"):
        batch.submit(list(range(CTX)), SamplingParams())
    with pytest.raises(LatentError, match="empty"):
        batch.submit([], SamplingParams())
    assert batch.idle


def test_exactness_probe_stops_where_a_layer_changes_with_rows():
    loaded = _tiny_llama(seed=1)
    assert exact_rows(loaded.model, 6) == 6  # MLX's quantized matmul: each row on its own

    class ChangesFromThreeRows(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, x):
            y = self.inner(x)
            return y + 1e-3 if x.shape[0] >= 3 else y

    mlp = loaded.model.layers[0].mlp
    mlp.down_proj = ChangesFromThreeRows(mlp.down_proj)
    assert exact_rows(loaded.model, 6) == 2
    assert BatchGenerator(loaded, max_batch=6).max_rows == 2
    assert BatchGenerator(loaded, max_batch=6, exact=False).max_rows == 6


def test_other_families_are_refused_by_name():
    Model, Args = get_model_classes("gpt2")
    gpt2 = Model(
        Args.from_dict(
            dict(
                model_type="gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32
            )
        )
    )
    reason = batch_unsupported(gpt2)
    assert reason and "gpt2" in reason
    with pytest.raises(LatentError, match="gpt2"):
        BatchGenerator(SimpleNamespace(model=gpt2, tokenizer=_Tok(), config={}, path=None))
    assert batch_unsupported(_tiny_llama().model) is None


@pytest.mark.slow
def test_smollm2_concurrent_greedy_requests_equal_lone_runs(default_model_path):
    """The default GGUF model: four chat prompts of different lengths, two joining later."""
    from engine.loading import load

    real = load(str(default_model_path))
    tok = real.tokenizer
    texts = [
        "Tell me about the sea.",
        "Hi",
        "Write two sentences about a cat that lives in an old house by a river.",
        "List three colours.",
    ]
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False
        )
        for t in texts
    ]
    assert len({len(p) for p in prompts}) == 4
    requests = [
        (p, SamplingParams(temperature=0.0, max_tokens=m, logprobs=1 if i == 0 else None))
        for i, (p, m) in enumerate(zip(prompts, (14, 8, 16, 10)))
    ]
    batch = BatchGenerator(real)
    got = _batched(batch, requests, join_at=[0, 0, 3, 5])
    assert batch.peak_rows >= 3
    for i, (prompt, params) in enumerate(requests):
        assert got[i] == _alone(real, prompt, params), texts[i]

"""Speculative decoding (engine/speculative.py) against plain decoding of the same target.

Greedy: the tokens, texts, finish reasons and logprobs of `stream_generate(..., draft=)` equal
those of plain `stream_generate` for several prompts and num_draft values, with drafts that
always agree (the target itself), often agree (a perturbed copy), never agree (an unrelated
random model, also of another size), for GQA KV, quantized KV and MLA latent caches, near
max_tokens, EOS and stop strings, with logits processors, through the Engine's prefix caches.
Sampling: seeded runs repeat; and a long run's tokens are distributed as the target's own
conditional distributions (a z-test per token id over 1,000 tokens, which the draft's
distributions fail, so the test has the power to catch a wrong acceptance rule). Also: a
draft with another vocabulary is refused with one clear error.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from toy_tokenizer import PIECES, VOCAB
from toy_tokenizer import ToyTokenizer as _Tok

from engine.errors import LatentError
from engine.generate import stream_generate
from engine.models import get_model_classes
from engine.sampling import SamplingParams, filter_logits
from engine.speculative import DraftCounts, check_draft, speculative_generate_step

CTX = 2048


TOK = _Tok()


def _llama(seed: int, hidden=48, layers=2, vocab=VOCAB, sharpen=8.0):
    Model, Args = get_model_classes("llama")
    args = Args.from_dict(
        dict(
            model_type="llama",
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=CTX,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    mx.random.seed(seed)
    model = Model(args)
    model.lm_head.weight = model.lm_head.weight * sharpen  # greedy paths far from ties
    mx.eval(model.parameters())
    return model


def _perturbed(model, seed: int, scale: float):
    """A copy of `model` with noise on every weight: a draft that agrees often, not always."""
    Model = type(model)
    copy = Model(model.args)
    mx.random.seed(seed)
    noisy = [
        (k, v + scale * mx.random.normal(v.shape) * mx.std(v)) for k, v in _flat(model.parameters())
    ]
    copy.load_weights(noisy)
    mx.eval(copy.parameters())
    return copy


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _loaded(model, tok=TOK):
    return SimpleNamespace(
        model=model, tokenizer=tok, config={}, path=None, info=SimpleNamespace(context_length=CTX)
    )


@pytest.fixture(scope="module")
def target():
    return _loaded(_llama(0))


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "self": target,
        "close": _loaded(_perturbed(target.model, 7, 0.15)),
        "random": _loaded(_llama(1, hidden=32, layers=1)),
    }


PROMPTS = [[5, 17, 3, 40, 22, 9, 31, 12, 7, 50, 2], [1], [60, 60, 60, 4]]


def _events(loaded, prompt, params, **kw):
    events = list(stream_generate(loaded, prompt, params, **kw))
    tokens = [e.token_id for e in events if not e.done]
    text = "".join(e.text for e in events)
    return events, tokens, text, events[-1].stats


@pytest.mark.parametrize("kind", ["self", "close", "random"])
def test_greedy_equals_plain_greedy(target, drafts, kind):
    params = SamplingParams(temperature=0.0, max_tokens=40)
    accepted = proposed = 0
    for prompt in PROMPTS:
        _, ref, ref_text, _ = _events(target, prompt, params)
        for k in (1, 2, 4, 7):
            _, got, text, st = _events(target, prompt, params, draft=drafts[kind], num_draft=k)
            assert got == ref, (kind, prompt, k)
            assert text == ref_text
            assert st.generated_tokens == len(ref) and st.finish_reason == "length"
            assert 0 <= st.draft_accepted <= st.draft_proposed
            accepted += st.draft_accepted
            proposed += st.draft_proposed
    rate = accepted / proposed
    # The three drafts do cover "always", "partly" and "rarely" agreeing.
    expect = {"self": (1.0, 1.0), "close": (0.3, 0.97), "random": (0.0, 0.2)}[kind]
    assert expect[0] <= rate <= expect[1], rate


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 6, 9])
def test_exact_max_tokens(target, drafts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    _, ref, _, _ = _events(target, PROMPTS[0], params)
    for kind in ("self", "close"):
        _, got, _, st = _events(target, PROMPTS[0], params, draft=drafts[kind], num_draft=4)
        assert got == ref and len(got) == max_tokens
        assert st.finish_reason == "length"


def test_eos_and_stop_strings_cut_where_plain_does(target, drafts):
    unlimited = SamplingParams(temperature=0.0, max_tokens=40)
    _, ref, ref_text, _ = _events(target, PROMPTS[0], unlimited)
    eos = ref[len(ref) // 2]
    eos_target = SimpleNamespace(**{**vars(target), "tokenizer": _EosTok(eos)})
    stop = ref_text[len(ref_text) // 3 : len(ref_text) // 3 + 3]
    for kind in ("self", "close", "random"):
        for k in (2, 5):
            a = _events(eos_target, PROMPTS[0], unlimited)
            b = _events(eos_target, PROMPTS[0], unlimited, draft=drafts[kind], num_draft=k)
            assert b[1] == a[1] and b[2] == a[2] and b[3].finish_reason == "stop"
            assert eos not in b[1]
            params = unlimited.replace(stop=[stop])
            a = _events(target, PROMPTS[0], params)
            b = _events(target, PROMPTS[0], params, draft=drafts[kind], num_draft=k)
            assert b[2] == a[2] and stop not in b[2] and b[3].finish_reason == "stop"
            assert b[1] == a[1]


class _EosTok(_Tok):
    def __init__(self, eos):
        super().__init__()
        self.eos_ids = {eos}


def test_logprobs_come_from_the_target(target, drafts):
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    ref, _, _, _ = _events(target, PROMPTS[0], params)
    got, _, _, _ = _events(target, PROMPTS[0], params, draft=drafts["close"], num_draft=4)
    ref = [e for e in ref if not e.done]
    got = [e for e in got if not e.done]
    assert [e.token_text for e in got] == [e.token_text for e in ref]
    np.testing.assert_allclose([e.logprob for e in got], [e.logprob for e in ref], atol=1e-4)
    for a, b in zip(got, ref, strict=True):
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_logits_processors_apply_to_every_verified_position(target, drafts):
    params = SamplingParams(
        temperature=0.0,
        max_tokens=30,
        repetition_penalty=1.8,
        frequency_penalty=0.3,
        logit_bias={3: 2.0, 9: -5.0},
    )
    for prompt in PROMPTS[:2]:
        _, ref, _, _ = _events(target, prompt, params)
        _, plain_unpenalised, _, _ = _events(target, prompt, params.replace(repetition_penalty=1.0))
        assert ref != plain_unpenalised  # the processors matter on this prompt
        for kind in ("self", "close"):
            _, got, _, _ = _events(target, prompt, params, draft=drafts[kind], num_draft=3)
            assert got == ref


@pytest.mark.parametrize("cache_kind", ["kv8", "mla"])
def test_other_caches_trim_correctly(cache_kind):
    if cache_kind == "mla":
        Model, Args = get_model_classes("tiny")
        args = Args(
            vocab_size=VOCAB,
            attention="mla",
            max_position_embeddings=CTX,
            tie_word_embeddings=False,
        )
        mx.random.seed(3)
        model = Model(args)
        model.lm_head.weight = model.lm_head.weight * 4
        mx.eval(model.parameters())
        make, noise = model.make_cache, 0.05
    else:
        model = _llama(4, hidden=128)  # head dim 32: what the KV quantizer groups by
        make, noise = (lambda: model.make_cache(kv_bits=8)), 0.2
    draft = _perturbed(model, 11, noise)
    prompt = PROMPTS[0]
    ref = [t for t, _ in _plain(model, prompt, make(), 30)]
    for k in (2, 4):
        counts = DraftCounts()
        got = [
            t
            for t, _ in speculative_generate_step(
                model, draft, prompt, make(), draft.make_cache(), num_draft=k,
                max_tokens=30, counts=counts,
            )
        ]  # fmt: skip
        assert got == ref
        assert 0 < counts.accepted < counts.proposed  # both accept and reject paths ran


def _plain(model, prompt, cache, n):
    from engine.generate import generate_step

    return generate_step(model, prompt, cache, max_tokens=n)


def test_caches_hold_exactly_the_emitted_history(target, drafts):
    """After a stream, each cache equals a fresh prefill of the tokens it claims to hold."""
    model, draft = target.model, drafts["close"].model
    cache, dcache = model.make_cache(), draft.make_cache()
    params = SamplingParams(temperature=0.0, max_tokens=17)
    _, toks, _, _ = _events(
        target, PROMPTS[0], params, cache=cache, draft=drafts["close"], draft_cache=dcache
    )
    history = PROMPTS[0] + toks
    for m, c in ((model, cache), (draft, dcache)):
        n = c[0].offset
        assert len(PROMPTS[0]) <= n <= len(history)
        fresh = m.make_cache()
        m(mx.array(history[:n])[None], cache=fresh)
        for a, b in zip(c, fresh, strict=True):
            np.testing.assert_allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-4)


def test_engine_with_draft_reuses_prefixes(target, drafts):
    from engine.session import Engine

    plain, spec = Engine(), Engine()
    plain.attach(target)
    spec.attach(target)
    spec.attach_draft(drafts["close"], num_draft=3)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    turn1 = PROMPTS[0]
    a1 = [e.token_id for e in plain.generate_ids(turn1, params) if not e.done]
    b1 = [e.token_id for e in spec.generate_ids(turn1, params) if not e.done]
    assert a1 == b1 and spec.last_stats.draft_proposed > 0
    turn2 = turn1 + a1 + [8, 30, 41]
    a2 = [e.token_id for e in plain.generate_ids(turn2, params) if not e.done]
    b2 = [e.token_id for e in spec.generate_ids(turn2, params) if not e.done]
    assert a2 == b2
    assert spec.last_stats.cached_tokens >= len(turn1)
    spec.attach_draft(None)
    assert spec.draft is None
    c2 = [e.token_id for e in spec.generate_ids(turn2, params) if not e.done]
    assert c2 == a2 and spec.last_stats.draft_proposed == 0


def test_cancel_ends_the_stream(target, drafts):
    flag = threading.Event()
    params = SamplingParams(temperature=0.0, max_tokens=40)
    got = []
    for ev in stream_generate(target, PROMPTS[0], params, flag, draft=drafts["self"]):
        if ev.done:
            assert ev.stats.finish_reason == "cancelled"
            break
        got.append(ev.token_id)
        if len(got) == 3:
            flag.set()
    assert len(got) == 3


def test_seeded_sampling_repeats_and_stays_valid(target, drafts):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, max_tokens=30, seed=1234)
    _, a, _, st = _events(target, PROMPTS[0], params, draft=drafts["close"], num_draft=3)
    _, b, _, _ = _events(target, PROMPTS[0], params, draft=drafts["close"], num_draft=3)
    _, c, _, _ = _events(target, PROMPTS[0], params.replace(seed=99), draft=drafts["close"])
    assert a == b and a != c
    assert all(0 <= t < VOCAB for t in a) and st.draft_proposed > 0


# --- the sampling distribution -------------------------------------------------------------

SMALL_V = 12


def _z_scores(tokens: list[int], dists: np.ndarray) -> np.ndarray:
    """Per token id: (observed count - Σ p_t(id)) / sqrt(Σ p_t(1 - p_t)).

    Under the null (token t drawn from dists[t] given the history) each numerator is a sum of
    martingale differences, so each z is about standard normal.
    """
    onehot = np.eye(dists.shape[1])[tokens]
    var = (dists * (1 - dists)).sum(axis=0)
    return (onehot.sum(axis=0) - dists.sum(axis=0)) / np.sqrt(np.maximum(var, 1e-9))


def _conditionals(model, prompt, tokens, params) -> np.ndarray:
    """The sampling distribution at each generated position, from one full forward pass."""
    seq = mx.array(prompt + tokens)[None]
    logits = model(seq)[0, len(prompt) - 1 : -1].astype(mx.float32)  # (n, V)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    x = filter_logits(logprobs, params.temperature, params.top_k, params.top_p, params.min_p)
    return np.array(mx.softmax(x, axis=-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_tokens=1000, seed=5),
        SamplingParams(temperature=0.7, top_k=6, max_tokens=1000, seed=6),
    ],
    ids=["t1", "t0.7-topk6"],
)
def test_sampled_tokens_follow_the_target_distribution(params):
    target = _llama(20, hidden=32, layers=1, vocab=SMALL_V, sharpen=2.0)
    draft = _perturbed(target, 21, 0.6)  # accepts 35-40% of proposals
    prompt = [1, 2, 3]
    counts = DraftCounts()
    tokens = [
        t
        for t, _ in speculative_generate_step(
            target, draft, prompt, target.make_cache(), draft.make_cache(), params,
            num_draft=3, max_tokens=params.max_tokens, counts=counts,
        )
    ]  # fmt: skip
    assert len(tokens) == params.max_tokens
    assert 0.25 < counts.accepted / counts.proposed < 0.9  # rejections happen, and acceptances
    z = _z_scores(tokens, _conditionals(target, prompt, tokens, params))
    assert np.abs(z).max() < 4.0, z
    # The same statistic against the draft's distributions is far off: the test can fail.
    z_draft = _z_scores(tokens, _conditionals(draft, prompt, tokens, params))
    assert np.abs(z_draft).max() > 6.0, z_draft


# --- the draft must share the tokenizer ----------------------------------------------------


def test_draft_with_another_vocabulary_is_refused(target):
    other = _loaded(_llama(1), _Tok(PIECES[:-1] + ["zz"]))
    with pytest.raises(LatentError, match="token 63 is 'zz'"):
        check_draft(target, other)
    bad = _loaded(_llama(1), SimpleNamespace(vocab_size=VOCAB + 5))
    with pytest.raises(LatentError, match="vocabulary of 69 tokens"):
        stream_generate(target, PROMPTS[0], SamplingParams(), draft=bad)
    with pytest.raises(LatentError, match="no tokenizer"):
        check_draft(target, _loaded(_llama(1), None))
    with pytest.raises(LatentError, match="num_draft"):
        stream_generate(target, PROMPTS[0], SamplingParams(), draft=target, num_draft=0)
    check_draft(target, _loaded(_llama(1), _Tok()))  # an equal vocabulary passes


def test_real_tokenizers_of_one_file_agree_and_differ_from_others(default_model_path):
    from engine.tokenizer import Tokenizer

    a = SimpleNamespace(model=object(), tokenizer=Tokenizer.from_path(default_model_path))
    b = SimpleNamespace(model=object(), tokenizer=Tokenizer.from_path(default_model_path))
    check_draft(a, b)
    c = SimpleNamespace(model=object(), tokenizer=_Tok())
    with pytest.raises(LatentError, match="speculative decoding needs the same tokenizer"):
        check_draft(a, c)


# --- the real model ------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_fp32_target_q4_draft(default_model_path):
    """SmolLM2 dequantized to fp32 as target, its own Q4_1 GGUF as draft: plain greedy tokens."""
    import engine
    from engine.blas import dequantize_model

    if default_model_path.suffix != ".gguf":
        pytest.skip("the default model here is not a GGUF file")
    target = engine.load(default_model_path)
    dequantize_model(target.model)
    draft = engine.load(default_model_path)
    ids = target.tokenizer.encode("The three primary colors are", add_special_tokens=True)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    _, ref, ref_text, _ = _events(target, ids, params)
    _, got, text, st = _events(target, ids, params, draft=draft, num_draft=4)
    assert got == ref and text == ref_text
    assert st.draft_accepted / st.draft_proposed > 0.6


@pytest.mark.slow
def test_cli_generate_with_draft(default_model_path):
    """`latent generate --draft`: the plain run's tokens, acceptance in --json; bad flags fail."""
    import json
    import subprocess
    import sys

    def latent(*args):
        cmd = [sys.executable, "-m", "app.cli", "generate", "--model", str(default_model_path)]
        return subprocess.run(
            [*cmd, "--prompt", "Name three colors.", "--temp", "0", "--max-tokens", "10", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    plain = latent("--json")
    spec = latent("--json", "--draft", str(default_model_path), "--num-draft", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    a, b = json.loads(plain.stdout), json.loads(spec.stdout)
    assert b["tokens"] == a["tokens"] and b["text"] == a["text"]
    assert b["draft_accepted"] >= 0.8 * b["draft_proposed"] > 0  # the same weights
    assert a["draft_proposed"] == 0
    shown = latent("--draft", str(default_model_path))
    assert shown.returncode == 0 and "draft accepted" in shown.stderr
    bad = latent("--draft", str(default_model_path), "--num-draft", "0")
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: num_draft=0")
    assert "Traceback" not in bad.stderr

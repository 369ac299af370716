"""Sampling rules agree with independent references.

Top-k / top-p / min-p filtering and the repetition penalty are compared with transformers'
own logits processors (PyTorch); presence/frequency penalty and logit bias with numpy float64
written from OpenAI's definition. Seeded sampling is reproducible and follows the filtered
distribution (a chi-square-style frequency check), greedy is argmax.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from engine.sampling import (
    SamplingParams,
    filter_logits,
    logit_bias_processor,
    make_logits_processors,
    make_sampler,
    presence_frequency_processor,
    repetition_penalty_processor,
)

tf_logits = pytest.importorskip("transformers.generation.logits_process")

V = 97


def _logits(seed: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, size=(batch, V)).astype(np.float32)
    x[:, 5] = x[:, 7]  # a tie, to pin tie handling
    return x


def _hf(warper, x: np.ndarray) -> np.ndarray:
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long)
    return warper(ids, torch.from_numpy(x.copy())).numpy()


def _same_support(ours: mx.array, ref: np.ndarray) -> None:
    ours = np.array(ours)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    finite = ~np.isinf(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_matches_transformers(k):
    x = _logits(k)
    _same_support(filter_logits(mx.array(x), top_k=k), _hf(tf_logits.TopKLogitsWarper(k), x))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95])
def test_top_p_matches_transformers(p):
    x = _logits(int(p * 100))
    _same_support(filter_logits(mx.array(x), top_p=p), _hf(tf_logits.TopPLogitsWarper(p), x))


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(m):
    x = _logits(int(m * 1000))
    _same_support(filter_logits(mx.array(x), min_p=m), _hf(tf_logits.MinPLogitsWarper(m), x))


def test_chain_matches_transformers_order():
    x = _logits(11)
    ref = x
    for w in (
        tf_logits.TemperatureLogitsWarper(0.7),
        tf_logits.TopKLogitsWarper(20),
        tf_logits.TopPLogitsWarper(0.9),
        tf_logits.MinPLogitsWarper(0.05),
    ):
        ref = _hf(w, ref)
    ours = filter_logits(mx.array(x), temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
    _same_support(ours, ref)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    x = _logits(3, batch=1)
    seen = [4, 9, 9, 30, 5, 60]
    ref = tf_logits.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([seen]), torch.from_numpy(x.copy())
    ).numpy()
    ours = repetition_penalty_processor(penalty, context=64)(mx.array(seen), mx.array(x))
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_only_looks_at_context_window():
    x = _logits(4, batch=1)
    seen = [1, 2, 3, 40, 41]
    ours = np.array(repetition_penalty_processor(2.0, context=2)(mx.array(seen), mx.array(x)))
    ref = x.astype(np.float64).copy()
    for t in {40, 41}:
        ref[0, t] = ref[0, t] * 2.0 if ref[0, t] < 0 else ref[0, t] / 2.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_presence_frequency_penalty_matches_openai_definition():
    x = _logits(5, batch=1)
    seen = [3, 3, 3, 8, 50, 50]
    ours = np.array(
        presence_frequency_processor(0.5, 0.25, context=64)(mx.array(seen), mx.array(x))
    )
    ref = x.astype(np.float64).copy()
    counts = np.bincount(seen, minlength=V)
    ref[0] -= counts * 0.25 + (counts > 0) * 0.5
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_logit_bias_adds_values():
    x = _logits(6, batch=1)
    ours = np.array(
        logit_bias_processor({3: 5.0, 10: -100.0})(mx.array([], dtype=mx.int32), mx.array(x))
    )
    ref = x.astype(np.float64).copy()
    ref[0, 3] += 5.0
    ref[0, 10] -= 100.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5)


def test_processors_from_params():
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.1, logit_bias={1: 2.0})
    assert len(make_logits_processors(params)) == 3
    assert make_logits_processors(SamplingParams()) == []


def test_greedy_is_argmax():
    x = _logits(7)
    np.testing.assert_array_equal(np.array(make_sampler(0.0)(mx.array(x))), x.argmax(-1))


def test_same_seed_same_tokens_other_seed_differs():
    x = mx.array(_logits(8, batch=1) / 3)

    def draw(seed):
        s = make_sampler(1.0, seed=seed)
        return [s(x).item() for _ in range(40)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)


def test_seeded_sampling_follows_filtered_distribution():
    x = np.zeros((1, 8), dtype=np.float32)
    x[0] = np.log([0.4, 0.3, 0.15, 0.1, 0.03, 0.01, 0.005, 0.005])
    s = make_sampler(1.0, top_k=3, seed=0)
    draws = np.array([s(mx.array(x)).item() for _ in range(3000)])
    assert set(draws.tolist()) <= {0, 1, 2}
    freq = np.bincount(draws, minlength=3)[:3] / len(draws)
    expected = np.array([0.4, 0.3, 0.15]) / 0.85
    np.testing.assert_allclose(freq, expected, atol=0.04)

"""Server pieces that need no model: loopback detection and seeds as OpenAI clients send them.

The seed case was found by fuzzing: an int64 seed below zero crashed MLX's key constructor
and answered 500.
"""

from __future__ import annotations

import mlx.core as mx

from app.server import is_loopback
from engine.sampling import make_sampler


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_any_int64_seed_samples_reproducibly():
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 50), key=mx.random.key(3)), axis=-1))
    for seed in (-(2**63), -1, 0, 2**63 - 1):
        assert 0 <= make_sampler(1.0, 0, 1.0, 0.0, seed)(logprobs).item() < 50
    first = make_sampler(1.0, 0, 1.0, 0.0, -7)
    again = make_sampler(1.0, 0, 1.0, 0.0, -7)
    assert [first(logprobs).item() for _ in range(8)] == [again(logprobs).item() for _ in range(8)]

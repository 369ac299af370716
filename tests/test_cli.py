"""`latent generate` and `latent chat` as a user runs them (subprocesses, the real default model).

`--json` output is parsed and checked against our tokenizer, computed independently in the
test: the prompt token count equals the chat-templated prompt's length, and the reported text
is the decoding of the reported token ids. Errors are one line, no traceback. `latent chat`
is driven through stdin with its slash commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _latent(
    *args: str, stdin: str | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_generate_json(default_model_path):
    from engine.tokenizer import Tokenizer

    prompt = "Name a fruit."
    out = _latent(
        "generate",
        "--model",
        str(default_model_path),
        "--prompt",
        prompt,
        "--max-tokens",
        "6",
        "--temp",
        "0",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    tok = Tokenizer.from_path(default_model_path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    assert data["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))
    assert 1 <= data["generated_tokens"] <= 6
    assert data["text"] == tok.decode(data["tokens"])  # no stop strings: nothing is cut
    for key in ("ttft_s", "prefill_tps", "decode_tps", "peak_memory_bytes"):
        assert data[key] > 0


def test_generate_streams_text_and_stats(default_model_path):
    out = _latent(
        "generate",
        "--model",
        str(default_model_path),
        "--prompt",
        "Say hi.",
        "--max-tokens",
        "4",
        "--temp",
        "0",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tok/s" in out.stderr and "TTFT" in out.stderr


def test_bad_model_is_one_line_error(tmp_path):
    out = _latent("generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "x")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.gguf" in lines[0]
    assert "Traceback" not in out.stderr


def test_chat_commands(default_model_path):
    script = "/system Answer in one word.\nHello\n/stats\n/reset\n/bogus\n/quit\n"
    out = _latent(
        "chat", "--model", str(default_model_path), "--max-tokens", "4", "--temp", "0", stdin=script
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "system prompt set" in out.stderr
    assert "tok/s" in out.stderr  # /stats
    assert "conversation reset" in out.stderr
    assert "unknown command" in out.stderr

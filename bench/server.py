"""Local API throughput: `latent serve` vs `mlx_lm.server` on SmolLM2-135M-Instruct, one run.

Each server runs alone (one after the other, so they never share the two cores) and answers the
same streamed chat requests (greedy, 32 new tokens) from 1 and then 4 concurrent clients.
Reported per setup: requests/s, generated tokens/s (content chunks counted the same way for
both), and the median time to first token. Ours serves the GGUF (its form as the app runs it);
mlx-lm serves the same weights dequantized to fp32 (its fastest form here), with OpenBLAS
preloaded for both where the machine has it.

    .venv/bin/python bench/server.py [--requests-per-client 3] [--max-tokens 32] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_info  # noqa: E402
from generate import write_fp32_folder  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokenizer_files(gguf: str, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, EOS) for mlx-lm, from the GGUF."""
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_path(gguf)
    tok._backend.save(str(folder / "tokenizer.json"))
    eos = tok.decode([tok.eos_id], skip_special_tokens=False)
    bos = tok.decode([tok.bos_id], skip_special_tokens=False) if tok.bos_id is not None else None
    config = {
        "chat_template": tok._template_text,
        "eos_token": eos,
        "bos_token": bos,
        "add_bos_token": bool(tok.add_bos),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def start(cmd: list[str], base: str, cwd: str) -> subprocess.Popen:
    env = dict(os.environ)
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    # Run outside the repo: its kernels/ folder would shadow the `kernels` package transformers
    # (inside mlx-lm) imports. Our own package installs as `latent_kernels` and is unaffected.
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        try:
            if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def one_request(base: str, i: int, max_tokens: int, model: str) -> dict:
    body = {
        "model": model,
        "stream": True,
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
    }
    t0 = time.perf_counter()
    ttft, chunks = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
    return {"ttft": ttft or 0.0, "tokens": chunks, "total": time.perf_counter() - t0}


def load_test(base: str, clients: int, per_client: int, max_tokens: int, model: str) -> dict:
    one_request(base, 999, 4, model)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(lambda i: one_request(base, i, max_tokens, model), range(clients * per_client))
        )
    wall = time.perf_counter() - t0
    return {
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_median_s": statistics.median(r["ttft"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args(argv)

    from engine.defaults import ensure_default_model

    gguf = str(ensure_default_model(progress=lambda *a: None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = write_fp32_folder(gguf, Path(tmp) / "smollm2-fp32")
        write_tokenizer_files(gguf, fp32)
        setups = {
            "ours (latent serve, GGUF Q4_1)": lambda p: [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--model",
                gguf,
                "--port",
                str(p),
            ],
            "mlx-lm (mlx_lm.server, fp32)": lambda p: [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                str(fp32),
                "--port",
                str(p),
            ],
        }
        for name, cmd in setups.items():
            port = _port()
            base = f"http://127.0.0.1:{port}"
            proc = start(cmd(port), base, tmp)
            try:
                for clients in (1, 4):
                    # mlx_lm.server loads whatever `model` names; ours serves its loaded model.
                    model = str(fp32) if name.startswith("mlx-lm") else "default"
                    res = load_test(base, clients, args.requests_per_client, args.max_tokens, model)
                    rows.append((name, clients, res))
                    print(name, clients, res, flush=True)
            finally:
                proc.terminate()
                proc.wait(30)

    ours = {c: r for n, c, r in rows if n.startswith("ours")}
    peer = {c: r for n, c, r in rows if n.startswith("mlx-lm")}
    lines = [
        "| server | clients | requests/s | tokens/s | median TTFT (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, clients, r in rows:
        lines.append(
            f"| {name} | {clients} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['ttft_median_s']:.2f} |"
        )
    for c in (1, 4):
        lines.append(
            f"| ratio ours / mlx-lm | {c} | {ours[c]['requests_per_s'] / peer[c]['requests_per_s']:.2f}x "
            f"| {ours[c]['tokens_per_s'] / peer[c]['tokens_per_s']:.2f}x "
            f"| {ours[c]['ttft_median_s'] / peer[c]['ttft_median_s']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        info = machine_info()
        text = (
            "\n## Local API server: ours vs mlx_lm.server (issue 9)\n\n"
            f"`.venv/bin/python bench/server.py --write` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{info.get('cpu', '')}: streamed greedy chat requests, {args.max_tokens} new tokens each, "
            f"{args.requests_per_client} requests per client; each server alone on the machine.\n\n"
            + table
            + "\n"
        )
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local API throughput: `latent serve` vs `mlx_lm.server` on SmolLM2-135M-Instruct, one run.

Each server answers the same streamed chat requests (greedy, 32 new tokens) from 1 and then 4
concurrent clients; all servers are up at once but only one is asked at a time, in rounds that
alternate between them (medians over rounds), so a busy machine slows every setup alike.
Reported per setup: requests/s, generated tokens/s (content chunks counted the same way for
both), and the median time to first token. Ours serves the GGUF (its form as the app runs it),
batched (the default) and one request at a time (`LATENT_SERVE_BATCH=1`); mlx-lm serves the
same weights dequantized to fp32 (its fastest form here), with OpenBLAS preloaded for all
where the machine has it.

`--engine` measures the engine alone, in one process, alternating: four requests decoded one
after another (`stream_generate`) vs together (`engine.batch.BatchGenerator`), and the cost of
one decode step for B rows with ragged per-row attention (what engine/batch.py does) vs one
left-padded cache with a padding mask (the alternative), with each layout's largest logit
difference from lone decoding.

    .venv/bin/python bench/server.py [--requests-per-client 3] [--max-tokens 32] [--rounds 2] [--write]
    .venv/bin/python bench/server.py --engine [--reps 5]
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
OURS = "ours (latent serve, GGUF Q4_1, batched)"
OURS_FIFO = "ours (LATENT_SERVE_BATCH=1: one at a time)"
PEER = "mlx-lm (mlx_lm.server, fp32)"


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


def start(cmd: list[str], base: str, cwd: str, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(extra_env or {})}
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
    ap.add_argument("--engine", action="store_true", help="engine-level batch measurements")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians)")
    ap.add_argument("--reps", type=int, default=5, help="--engine: repetitions")
    args = ap.parse_args(argv)
    if args.engine:
        print(engine_bench(args.reps, args.max_tokens))
        return 0

    from engine.defaults import ensure_default_model

    gguf = str(ensure_default_model(progress=lambda *a: None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = write_fp32_folder(gguf, Path(tmp) / "smollm2-fp32")
        write_tokenizer_files(gguf, fp32)
        ours = [sys.executable, "-m", "app.cli", "serve", "--model", gguf, "--port"]
        peer = [sys.executable, "-m", "mlx_lm", "server", "--model", str(fp32), "--port"]
        setups = {  # name: (command without the port, environment)
            OURS: (ours, {}),
            OURS_FIFO: (ours, {"LATENT_SERVE_BATCH": "1"}),
            PEER: (peer, {}),
        }
        # All servers up at once (idle ones cost no CPU), then rounds that alternate between
        # them, so a load change on the machine hits every setup alike; medians over rounds.
        procs, bases = [], {}
        try:
            for name, (cmd, env) in setups.items():
                port = _port()
                bases[name] = f"http://127.0.0.1:{port}"
                procs.append(start([*cmd, str(port)], bases[name], tmp, env))
            runs: dict[tuple[str, int], list[dict]] = {}
            names = list(setups)
            for r in range(args.rounds):
                for clients in (1, 4):
                    # each round starts at another setup, so none always follows the same one
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        time.sleep(2)  # let the previous server's last work drain
                        # mlx_lm.server loads whatever `model` names; ours serves its own model.
                        model = str(fp32) if name == PEER else "default"
                        res = load_test(
                            bases[name], clients, args.requests_per_client, args.max_tokens, model
                        )
                        runs.setdefault((name, clients), []).append(res)
                        print(name, clients, res, flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
        for clients in (1, 4):
            for name in setups:
                got = runs[(name, clients)]
                rows.append(
                    (name, clients, {k: statistics.median(r[k] for r in got) for k in got[0]})
                )

    ours = {c: r for n, c, r in rows if n == OURS}
    fifo = {c: r for n, c, r in rows if n == OURS_FIFO}
    peer = {c: r for n, c, r in rows if n == PEER}
    lines = [
        "| server | clients | requests/s | tokens/s | median TTFT (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, clients, r in rows:
        lines.append(
            f"| {name} | {clients} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['ttft_median_s']:.2f} |"
        )
    for label, other in (("mlx-lm", peer), ("ours one at a time", fifo)):
        for c in (1, 4):
            lines.append(
                f"| ratio ours batched / {label} | {c} "
                f"| {ours[c]['requests_per_s'] / other[c]['requests_per_s']:.2f}x "
                f"| {ours[c]['tokens_per_s'] / other[c]['tokens_per_s']:.2f}x "
                f"| {ours[c]['ttft_median_s'] / other[c]['ttft_median_s']:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    if args.write:
        info = machine_info()
        text = (
            f"{SECTION}\n\n"
            f"`.venv/bin/python bench/server.py --write` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{info.get('cpu', '')}: streamed greedy chat requests, {args.max_tokens} new tokens each, "
            f"{args.requests_per_client} requests per client, medians of {args.rounds} alternating rounds.\n\n"
            + table
            + "\n"
        )
        write_section(ROOT / "BENCHMARKS.md", text)
    return 0


SECTION = "## Local API server: ours vs mlx_lm.server (issue 9)"


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section of BENCHMARKS.md up to its hand-written "Reading:" (or the
    next section), or append the section when there is none."""
    doc = path.read_text()
    start = doc.find(SECTION)
    if start < 0:
        path.write_text(doc.rstrip("\n") + "\n\n" + text)
        return
    rest = doc[start + len(SECTION) :]
    ends = [i for i in (rest.find("\nReading:"), rest.find("\n## ")) if i >= 0]
    end = start + len(SECTION) + (min(ends) if ends else len(rest))
    path.write_text(doc[:start] + text + doc[end:])


# ----------------------------------------------------------------------------- --engine


def _padded_step(model, caches: list[list], tokens):
    """One decode step over a left-padded (B, H, S, D) copy of per-row caches (the layout
    engine/batch.py does not use): per-row RoPE offsets, a padding mask, the model's own call."""
    import mlx.core as mx

    class Padded:
        def __init__(self, rows):
            n = max(c.offset for c in rows)
            self.pad = [n - c.offset for c in rows]
            self.idx = n

            def stack(part):
                return mx.concatenate(
                    [mx.pad(part(c), [(0, 0), (0, 0), (n - c.offset, 0), (0, 0)]) for c in rows]
                )  # (B, H, n, D)

            self.keys = stack(lambda c: c.keys[..., : c.offset, :])
            self.values = stack(lambda c: c.values[..., : c.offset, :])

        @property
        def offset(self):
            return mx.array([self.idx - p for p in self.pad])

        def update_and_fetch(self, k, v):
            self.keys = mx.concatenate([self.keys, k], axis=2)
            self.values = mx.concatenate([self.values, v], axis=2)
            self.idx += k.shape[2]
            return self.keys, self.values

    layers = [Padded([c[i] for c in caches]) for i in range(len(caches[0]))]
    mx.eval([(c.keys, c.values) for c in layers])  # the re-layout is not timed
    keys = mx.arange(layers[0].idx + 1)
    mask = (keys[None] >= mx.array(layers[0].pad)[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return lambda: model(tokens, cache=layers, mask=mask)[:, -1, :]


def engine_bench(reps: int, max_tokens: int) -> str:
    """Tokens/s of four requests one after another vs batched, and step cost by layout."""
    import mlx.core as mx

    import engine
    from engine.batch import BatchGenerator
    from engine.defaults import ensure_default_model
    from engine.generate import stream_generate
    from engine.sampling import SamplingParams

    loaded = engine.load(str(ensure_default_model(progress=lambda *a: None)))
    model, tok = loaded.model, loaded.tokenizer
    batch = BatchGenerator(loaded)
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]
            ),
            add_special_tokens=False,
        )
        for i in range(4)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    def lone() -> float:
        t0, n = time.perf_counter(), 0
        for p in prompts:
            n += sum(1 for e in stream_generate(loaded, p, params) if not e.done)
        return n / (time.perf_counter() - t0)

    def together(k: int) -> float:
        for p in prompts[:k]:
            batch.submit(p, params)
        t0, n = time.perf_counter(), 0
        while not batch.idle:
            n += sum(1 for _, e in batch.step() if not e.done)
        return n / (time.perf_counter() - t0)

    runs: dict[str, list[float]] = {}
    for _ in range(reps):  # alternating, so load changes hit every setup alike
        for name, fn in (
            ("lone", lone),
            ("batch1", lambda: together(1)),
            ("batch4", lambda: together(4)),
        ):
            runs.setdefault(name, []).append(fn())
    med = {k: statistics.median(v) for k, v in runs.items()}
    lines = [
        f"decode, 4 requests x {max_tokens} tokens, median of {reps} (tokens/s):",
        f"  one after another (stream_generate): {med['lone']:.1f}",
        f"  BatchGenerator, one request at a time: {med['batch1']:.1f}",
        f"  BatchGenerator, all four together: {med['batch4']:.1f} ({med['batch4'] / med['lone']:.2f}x)",
    ]

    def prefilled(p):
        cache = model.make_cache()
        model(mx.array(p[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    lines.append(f"one decode step, ms (median of {reps * 3}); max |logit - lone logit|:")
    for rows in (1, 2, 4):
        tokens = mx.array([[p[-1]] for p in prompts[:rows]])
        lone_logits = [
            model(tokens[b : b + 1], cache=prefilled(prompts[b]))[0, -1] for b in range(rows)
        ]
        times: dict[str, list[float]] = {"ragged": [], "padded": []}
        diffs = {}
        for _ in range(reps * 3):
            for name in times:
                caches = [prefilled(p) for p in prompts[:rows]]
                if name == "ragged":
                    run = lambda c=caches, t=tokens: batch._forward(t, c)  # noqa: E731
                else:
                    run = _padded_step(model, caches, tokens)
                t0 = time.perf_counter()
                logits = run()
                mx.eval(logits)
                times[name].append(time.perf_counter() - t0)
                diffs[name] = max(
                    mx.abs(logits[b] - lone_logits[b]).max().item() for b in range(rows)
                )
        lines.append(
            f"  B={rows}: ragged {1e3 * statistics.median(times['ragged']):.1f} (max diff "
            f"{diffs['ragged']:.1e}), padded {1e3 * statistics.median(times['padded']):.1f} "
            f"(max diff {diffs['padded']:.1e})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

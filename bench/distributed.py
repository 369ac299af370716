"""Data-parallel LoRA on one machine: tokens/s with 1 vs N processes, and bytes on the wire per step.

Usage: `python bench/distributed.py [--procs 2 3] [--steps 8] [--model PATH]` prints a markdown table.
Each run is a fresh set of processes (MLX ring on 127.0.0.1). Throughput is the trainer's own
`tokens_per_s` (all ranks' tokens / step wall time), median over the steps after the first.
Bytes are read from the kernel: the sum over this process's TCP sockets of TCP_INFO
`tcpi_bytes_acked` (offset 120 in Linux's struct tcp_info), taken at the first and the last step
event, so only the steady-state steps count; the table averages over ranks and compares with a
ring all-reduce's 2(n-1)/n × trainable bytes (plus the 16 bytes of per-step flags and counts).

Default model: a random llama (hidden 256, 4 layers, BPE vocab 300) on a generated corpus,
sequence 128, batch 8 — small enough for 2 shared cores. `--model` takes any model the trainer
takes (e.g. the SmolLM2 GGUF), with its own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent / "tests"))


def tcp_bytes_sent() -> int:
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=int(fd))
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                total += struct.unpack_from("<Q", info, 120)[0]
        except OSError:
            pass
        finally:
            s.detach()
    return total


def rank_main(spec: dict) -> None:
    from engine.blas import maybe_reexec_with_openblas

    maybe_reexec_with_openblas()  # as `latent finetune` does (LATENT_NO_OPENBLAS=1 turns it off)
    from engine.distributed import init_group
    from engine.train.trainer import TrainConfig, train

    group = init_group()
    me = group.rank() if group is not None else 0
    tps, marks = [], []
    for ev in train(TrainConfig(**spec["config"]), None, group):
        if ev.kind == "step":
            tps.append(ev.tokens_per_s)
            if ev.step == 1 or ev.step == ev.total_steps:
                marks.append(tcp_bytes_sent())
    Path(f"{spec['out']}.{me}").write_text(json.dumps({"tps": tps, "bytes": marks}))


def trainable_bytes(config: dict) -> int:
    """Bytes of the adapter the config trains (built once here, the same way the trainer does)."""
    from mlx.utils import tree_flatten

    import engine
    from engine.train import lora as L

    loaded = engine.load(config["model"])
    n = len(loaded.model.layers)
    L.apply_lora(
        loaded.model, config.get("targets", "all"), config["rank"], config["alpha"], 0.0, n
    )
    return sum(v.nbytes for _, v in tree_flatten(loaded.model.trainable_parameters()))


def run(n: int, config: dict, out: Path) -> dict:
    from engine.distributed import spawn_local

    spec = json.dumps({"config": config, "out": str(out)})
    env = {}
    if n == 1:
        subprocess.run(
            [sys.executable, str(HERE), "--rank-spec", spec], check=True, env={**os.environ, **env}
        )
        return {0: json.loads(Path(f"{out}.0").read_text())}
    procs = spawn_local(n, [str(HERE), "--rank-spec", spec], env=env)
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"rank exited with {p.returncode}")
    return {r: json.loads(Path(f"{out}.{r}").read_text()) for r in range(n)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternate 1, N, ... processes this many times"
    )
    ap.add_argument("--rank-spec")
    args = ap.parse_args()
    if args.rank_spec:
        rank_main(json.loads(args.rank_spec))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    if args.model:
        model, data = args.model, args.data
    else:
        from test_distributed_lora import make_tiny

        model, data = make_tiny(root, hidden=256, layers=4, docs=40)
    config = dict(
        model=str(model),
        data=str(data),
        run_dir=str(root / "run"),
        out=str(root / "adapter"),
        rank=8,
        alpha=16.0,
        max_seq_len=args.seq,
        batch_size=args.batch,
        grad_accum=1,
        max_steps=args.steps,
        eval_every=0,
        save_every=0,
        val_fraction=0.0,
        val_batches=1,
        seed=0,
    )
    p_bytes = trainable_bytes(config)
    counts = [1, *args.procs]
    tps_runs: dict[int, list[float]] = {n: [] for n in counts}
    measured: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(args.rounds):  # alternate, so a busy moment of the machine hits every count
        for n in counts:
            cfg = {
                **config,
                "run_dir": str(root / f"run{n}-{i}"),
                "out": str(root / f"adapter{n}-{i}"),
            }
            res = run(n, cfg, root / f"out{n}-{i}")
            tps_runs[n].append(statistics.median(res[0]["tps"][1:]))
            if n > 1:
                measured[n] += [
                    (r["bytes"][-1] - r["bytes"][0]) / (args.steps - 1) for r in res.values()
                ]
    rows = []
    for n in counts:
        formula = 2 * (n - 1) / n * (p_bytes + 16) if n > 1 else 0.0
        rows.append(
            (
                n,
                statistics.median(tps_runs[n]),
                statistics.mean(measured[n]) if n > 1 else 0.0,
                formula,
                tps_runs[n],
            )
        )
    print(
        f"\ntrainable (LoRA) bytes: {p_bytes:,}; model {model}; seq {args.seq}, global batch {args.batch}, "
        f"{args.steps} steps\n"
    )
    print(
        "| processes | tokens/s (median of rounds) | each round | vs 1 process | bytes sent per step "
        "per rank (measured) | ring formula 2(n-1)/n × (bytes + 16) | measured / formula |"
    )
    print("|---|---|---|---|---|---|---|")
    base = rows[0][1]
    for n, tps, meas, form, each in rows:
        ratio = f"{meas / form:.4f}" if form else "-"
        print(
            f"| {n} | {tps:.0f} | {', '.join(f'{t:.0f}' for t in each)} | {tps / base:.2f}x "
            f"| {meas:,.0f} | {form:,.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()

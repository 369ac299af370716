"""Fine-tuning speed and memory: our trainer vs mlx-lm's LoRA trainer, same everything.

    python bench/train.py [--steps 4] [--seq-len 64] [--batch 4] [--rank 8] [--num-layers 16] [--quick]

Model: the default SmolLM2-135M-Instruct GGUF (Q4_1, partly Q8_0), written once by our
`export` as an MLX-format folder (affine 4/8-bit, group 32, the GGUF's own grid) so mlx-lm loads
the very same quantized weights: this is QLoRA for both. Data: one generated text folder, chunked
by our `build_dataset`; mlx-lm is fed the same token chunks. Same rank, scale, targets (q/k/v/o and
the MLP of the last N layers), sequence length, batch and optimizer (AdamW). Each configuration
runs in its own process (clean peak memory), with Debian's OpenBLAS preloaded for both when
present. Reported: median training tokens/s over steps 2..N (step 1 warms up), MLX peak memory
and peak RSS (VmHWM) of the process. Prints a markdown section on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _vm_hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_corpus(folder: Path, n_docs: int) -> None:
    import random

    rng = random.Random(0)
    words = (
        "harbor lantern copper meadow river glass archive orchard signal winter engine "
        "market bridge valley letter garden thunder silver paper station"
    ).split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sents = [
            " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
            for _ in range(60)
        ]
        (folder / f"doc{i:03d}.txt").write_text(" ".join(sents))


def prepare(work: Path) -> tuple[Path, Path]:
    import engine
    from engine.defaults import ensure_default_model
    from engine.train.lora import export

    gguf = ensure_default_model(progress=lambda *a: None)
    folder = work / "smollm2-q4"
    if not (folder / "model.safetensors").exists():
        loaded = engine.load(gguf)
        export(loaded.model, gguf, folder, config=loaded.config)
    data = work / "data"
    make_corpus(data, 24)
    return folder, data


# -- children ---------------------------------------------------------------------------------


def child_ours(a) -> dict:
    import mlx.core as mx

    import engine
    from engine.train.trainer import TrainConfig, train

    loaded = engine.load(a.model)
    mx.reset_peak_memory()
    cfg = TrainConfig(
        model=loaded,
        data=a.data,
        out=str(Path(a.work) / "out-ours"),
        run_dir=str(Path(a.work) / f"run-ours-{a.ckpt}-{time.time_ns()}"),
        max_seq_len=a.seq_len,
        overlap=0,
        batch_size=a.batch,
        max_steps=a.steps,
        rank=a.rank,
        alpha=2.0 * a.rank,
        targets=TARGETS,
        num_layers=a.num_layers,
        lr=1e-4,
        val_fraction=0.0,
        eval_every=0,
        save_every=0,
        val_batches=1,
        grad_checkpoint=bool(a.ckpt),
        warmup_steps=0,
        dequantize_base=False if a.child == "ours-qmm" else None,
    )
    tps, losses = [], []
    for ev in train(cfg):
        if ev.kind == "step":
            tps.append(ev.tokens_per_s)
            losses.append(ev.loss)
    return {"tps": tps, "losses": losses, "peak": mx.get_peak_memory(), "rss": _vm_hwm()}


def child_mlx_lm(a) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from engine.tokenizer import Tokenizer
    from engine.train.data import build_dataset

    tok = Tokenizer.from_path(a.model)
    ds, _ = build_dataset(a.data, tok, a.seq_len, overlap=0, val_fraction=0.0)
    chunks = [(e.tokens.tolist(), 0) for e in ds.train]
    model, _ = load_model(Path(a.model))
    model.freeze()
    linear_to_lora_layers(
        model, a.num_layers, {"rank": a.rank, "scale": 2.0, "dropout": 0.0, "keys": TARGETS}
    )
    mx.reset_peak_memory()

    class CB(TrainingCallback):
        def __init__(self):
            self.tps, self.losses = [], []

        def on_train_loss_report(self, info):
            self.tps.append(info["tokens_per_second"])
            self.losses.append(info["train_loss"])

    cb = CB()
    args = TrainingArgs(
        batch_size=a.batch,
        iters=a.steps,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=a.seq_len,
        grad_checkpoint=bool(a.ckpt),
        adapter_file=str(Path(a.work) / "mlx-lm-adapters.safetensors"),
    )
    train(model, optim.AdamW(learning_rate=1e-4), chunks, None, args, training_callback=cb)
    return {"tps": cb.tps, "losses": cb.losses, "peak": mx.get_peak_memory(), "rss": _vm_hwm()}


# -- parent -----------------------------------------------------------------------------------


def run_child(which: str, ckpt: int, a, model: Path, data: Path, work: Path) -> dict:
    env = dict(os.environ)
    from engine.blas import openblas_path

    lib = openblas_path()
    if lib and not env.get("LATENT_NO_OPENBLAS") and "openblas" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--ckpt",
        str(ckpt),
        "--model",
        str(model),
        "--data",
        str(data),
        "--work",
        str(work),
        "--steps",
        str(a.steps),
        "--seq-len",
        str(a.seq_len),
        "--batch",
        str(a.batch),
        "--rank",
        str(a.rank),
        "--num-layers",
        str(a.num_layers),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{which} (ckpt={ckpt}) failed: {out.stderr.strip()[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=["ours", "ours-qmm", "mlx_lm"])
    ap.add_argument("--ckpt", type=int, default=0)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--work")
    a = ap.parse_args(argv)
    if a.child:
        res = (child_mlx_lm if a.child == "mlx_lm" else child_ours)(a)
        print("RESULT " + json.dumps(res))
        return 0
    if a.quick:
        a.steps, a.seq_len, a.batch = 3, 64, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = prepare(work)
        rows = []
        for ckpt in (0, 1):
            for which in ("ours", "ours-qmm", "mlx_lm"):
                print(f"== {which}, grad checkpoint {'on' if ckpt else 'off'}", file=sys.stderr)
                r = run_child(which, ckpt, a, model, data, work)
                tps = statistics.median(r["tps"][1:] or r["tps"])
                rows.append((which, ckpt, tps, r["peak"], r["rss"], r["losses"]))
    from engine.blas import openblas_path

    blas = (
        "OpenBLAS preloaded"
        if openblas_path() and not os.environ.get("LATENT_NO_OPENBLAS")
        else "reference BLAS"
    )
    print("## Fine-tuning: QLoRA training speed and memory, ours vs mlx-lm\n")
    print(
        f"SmolLM2-135M-Instruct, GGUF Q4_1 weights for both (4-bit base frozen, fp32 adapters); "
        f"LoRA rank {a.rank}, scale 2.0, q/k/v/o + MLP of the last {a.num_layers} layers; "
        f"{a.batch} × {a.seq_len} tokens per step, AdamW; median of steps 2..{a.steps}; "
        f"one process per row, {blas}; `python bench/train.py"
        f"{' --quick' if a.quick else ''}`.\n"
    )
    print(
        "| trainer | grad checkpoint | train tok/s | MLX peak memory | peak RSS | loss step 1 → last |"
    )
    print("|---|---|---|---|---|---|")
    for which, ckpt, tps, peak, rss, losses in rows:
        name = {
            "ours": "ours (dequantized GEMM, default on CPU)",
            "ours-qmm": "ours (quantized matmul, `dequantize_base=False`)",
            "mlx_lm": "mlx-lm 0.32 tuner",
        }[which]
        print(
            f"| {name} | {'on' if ckpt else 'off'} | {tps:.1f} | {peak / 2**20:.0f} MB | "
            f"{rss / 2**20:.0f} MB | {losses[0]:.3f} → {losses[-1]:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

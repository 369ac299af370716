"""`latent finetune`: train a LoRA (QLoRA on quantized models) adapter on a folder of documents.

Prints the data report, a one-line progress bar (step, loss, validation loss, tokens/s, ETA,
memory), and at the end a before/after perplexity table. Ctrl-C stops at the next step boundary
with a checkpoint (`--resume RUN` continues it); a second Ctrl-C aborts. This module only parses
arguments and formats events; the work is engine/train's.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a folder of your documents (LoRA)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model", "-m", help="model folder, .gguf or repo id (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data", help="folder of .txt/.md/.pdf/.html/.docx/.jsonl files (searched recursively)"
    )
    p.add_argument("--out", help="adapter folder to write (default: the app's adapters folder)")
    p.add_argument(
        "--resume", metavar="RUN", help="continue a run (its folder or name under runs/)"
    )
    p.add_argument("--run-dir", help="where checkpoints go (default: the app's runs folder)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default: 2·rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--targets", default="all", help="attention, mlp, all, qv or layer names, comma-separated"
    )
    p.add_argument("--num-layers", type=int, help="adapt only the last N decoder layers")
    p.add_argument(
        "--full",
        action="store_true",
        help="full fine-tuning instead of LoRA (small unquantized models)",
    )
    p.add_argument(
        "--max-seq-len", type=int, help="tokens per training chunk (default: 512 or the context)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument(
        "--early-stopping", type=int, help="stop after N evaluations without improvement"
    )
    p.add_argument("--grad-checkpoint", action="store_true", help="less memory, ~30%% more compute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", metavar="DIR", help="also write a standalone fused model folder")
    p.add_argument(
        "--hosts",
        metavar="FILE",
        help="data-parallel over the hosts of this file (see `latent hosts`)",
    )
    p.set_defaults(func=run)


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "--:--"
    s = int(s)
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def progress_line(ev, val_loss: float | None, width: int = 24) -> str:
    frac = ev.step / max(1, ev.total_steps)
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    val = f" val {val_loss:.3f}" if val_loss is not None else ""
    return (
        f"[{bar}] {ev.step}/{ev.total_steps} loss {ev.loss:.3f}{val} "
        f"{ev.tokens_per_s:.0f} tok/s ETA {_fmt_time(ev.eta_s)} mem {_fmt_bytes(ev.peak_memory)}"
    )


def _before_from_log(run_dir: Path) -> float | None:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and not rec.get("step"):
            return rec.get("val_ppl")
    return None


def run(args: argparse.Namespace) -> int:
    from engine.errors import TrainingError
    from engine.train.trainer import TrainConfig, train

    if not args.resume and not args.data:
        raise TrainingError("--data DIR is required (or --resume RUN)")
    model = args.model
    if not model and not args.resume:
        from app.commands.generate import resolve_model

        model = resolve_model(None)
    config = TrainConfig(
        model=model,
        data=args.data or "",
        out=args.out,
        run_dir=args.run_dir,
        resume=args.resume,
        fine_tune_type="full" if args.full else "lora",
        targets=args.targets,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        dropout=args.dropout,
        num_layers=args.num_layers,
        max_seq_len=args.max_seq_len,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        save_every=args.save_every,
        early_stopping=args.early_stopping,
        grad_checkpoint=args.grad_checkpoint,
        seed=args.seed,
    )

    from engine.distributed import in_job, init_group, relaunch_cli

    if args.hosts and not in_job():  # start one rank per host through mlx.launch
        return relaunch_cli(args.hosts)
    group = init_group()  # also when started by `mlx.launch ... latent finetune`
    if group is not None and group.rank() != 0:  # rank 0 reports and writes
        for _ in train(config, None, group):
            pass
        return 0
    if group is not None:
        print(f"data-parallel over {group.size()} processes (this is rank 0)", file=sys.stderr)
    cancel = threading.Event()

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

    old = signal.signal(signal.SIGINT, on_sigint)
    tty = sys.stderr.isatty()
    before = after = None
    val_loss = None
    last_print = 0.0
    run_dir = None
    out = None
    eval_name = "validation"
    try:
        for ev in train(config, cancel, group):
            if ev.kind == "data":
                print(ev.message, file=sys.stderr)
            elif ev.kind == "start":
                print(ev.message, file=sys.stderr)
                run_dir = Path(ev.checkpoint) if ev.checkpoint else None
            elif ev.kind == "eval":
                val_loss = ev.val_loss
                eval_name = ev.message.replace(" before training", "")
                if ev.step == 0:
                    before = ev.val_ppl
                elif after is None or ev.val_ppl < after:
                    after = ev.val_ppl
                if not tty:
                    print(
                        f"step {ev.step}: {eval_name} loss {ev.val_loss:.4f} ppl {ev.val_ppl:.2f}"
                        f"{' (best)' if ev.is_best else ''}",
                        file=sys.stderr,
                    )
            elif ev.kind == "step":
                line = progress_line(ev, val_loss)
                now = time.monotonic()
                if tty:
                    print("\r" + line, end="", file=sys.stderr, flush=True)
                elif now - last_print > 10 or ev.step == ev.total_steps:
                    print(line, file=sys.stderr, flush=True)
                    last_print = now
            elif ev.kind in ("cancelled", "stopped"):
                print(("\n" if tty else "") + ev.message, file=sys.stderr)
            elif ev.kind == "done":
                out = ev.checkpoint
                if tty:
                    print(file=sys.stderr)
                print(ev.message, file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, old)

    if before is None and run_dir is not None:
        before = _before_from_log(run_dir)
    if before is not None or after is not None:
        print(f"\nperplexity on {eval_name}")
        print(f"  {'before':>10} {'after':>10} {'change':>8}")
        b = f"{before:10.2f}" if before is not None else f"{'n/a':>10}"
        a = f"{after:10.2f}" if after is not None else f"{'n/a':>10}"
        change = f"{(after / before - 1) * 100:+7.1f}%" if before and after else f"{'':>8}"
        print(f"  {b} {a} {change}")
    if out and args.export:
        _export(config, out, args.export, run_dir)
    return 0 if out else 1


def _export(config, adapter: str, dest: str, run_dir) -> None:
    import engine
    from engine.train.lora import export

    model_src = config.model
    if config.resume:
        from engine.train.trainer import Run

        model_src = json.loads((Run.resolve(config.resume).root / "config.json").read_text())[
            "model"
        ]
    loaded = engine.load(model_src, adapter=adapter)
    path = export(loaded.model, loaded.path, dest, config=loaded.config)
    print(f"standalone model written to {path}")

"""The fine-tuning loop: LoRA/QLoRA (or full) training as a generator of plain progress events.

`train(config, cancel)` loads the model, builds the dataset (engine/train/data.py), applies the
adapters (engine/train/lora.py) and runs AdamW with warmup + cosine decay, gradient accumulation,
optional gradient checkpointing, validation loss/perplexity every `eval_every` steps (the best
adapter kept, early stopping), and checkpoints every `save_every` steps.

Reproducibility is by construction: which chunks step s trains on is a pure function of (seed, s)
(one fixed permutation per epoch), and dropout draws from a key seeded by (seed, s, micro-batch).
A checkpoint holds the trainable weights, the optimizer state and the run state, written to a
temporary folder, then renamed, then named in `latest.json` (replaced atomically) — so a run
killed at any moment resumes from its last checkpoint and produces the same losses as a run that
was never interrupted. A NaN/inf loss stops the run before the bad update, keeping the last good
checkpoint.

This module does not know about files of documents, adapter formats or front ends: the CLI and
the GUI consume `TrainEvent`s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from engine.errors import TrainingError
from engine.train import lora as L
from engine.train.compute import dequantized_compute, set_grad_checkpoint
from engine.train.data import DataReport, Dataset, Example, build_dataset, collate


@dataclass
class TrainConfig:
    model: Any  # path / repo id, or an already loaded `engine.LoadedModel`
    data: str  # folder of documents
    out: str | None = None  # where the final (best) adapter goes; default adapters_dir()/<run>
    run_dir: str | None = None  # checkpoints and log; default runs_dir()/<run>
    resume: str | None = None  # a run folder (or its name under runs_dir()) to continue
    fine_tune_type: str = "lora"  # "lora" (QLoRA on a quantized base) or "full"
    targets: Any = "all"  # LoRA targets: presets attention/mlp/all/qv, leaf names or paths
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    num_layers: int | None = None  # adapt the last N decoder layers (None: all)
    max_seq_len: int | None = 512  # None: 512 or the model's context if shorter
    overlap: int | None = None
    val_fraction: float = 0.1
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; when set, overrides epochs
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50  # 0: only at the start and the end
    val_batches: int | None = 25  # cap on validation batches per eval (None: all)
    save_every: int = 50
    early_stopping: int | None = None  # stop after this many evals without improvement
    grad_checkpoint: bool = False
    # Quantized base layers computed as fp32 GEMMs on dequantized weights (+ a kept fp32 copy of
    # the output head): much faster on a CPU with OpenBLAS, more memory. None: automatic.
    dequantize_base: bool | None = None
    seed: int = 0
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not isinstance(d["model"], (str, os.PathLike)):
            d["model"] = str(getattr(d["model"], "path", d["model"]))
        d["model"] = str(d["model"])
        return d


@dataclass
class TrainEvent:
    kind: (
        str  # "data" | "start" | "step" | "eval" | "checkpoint" | "done" | "cancelled" | "stopped"
    )
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    peak_memory: int | None = None
    checkpoint: str | None = None
    is_best: bool = False
    message: str = ""
    report: DataReport | None = None

    @property
    def best(self) -> bool:
        return self.is_best


@dataclass
class RunState:
    step: int = 0
    best_val: float | None = None
    evals_since_best: int = 0
    losses: list[float] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Pieces


def warmup_cosine(lr: float, warmup: int, total: int, min_ratio: float):
    """Linear warmup from 0 to lr over `warmup` steps, then cosine down to lr·min_ratio."""

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = lr * (s + 1) / max(1, warmup)
        progress = mx.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
        cos = lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + mx.cos(math.pi * progress)))
        return mx.where(s < warmup, warm, cos)

    return schedule


def loss_terms(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """(sum of masked next-token cross-entropy, number of masked tokens)."""
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    m = mask.astype(mx.float32)
    return (ce * m).sum(), m.sum()


def evaluate(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    max_batches: int | None = None,
) -> float:
    """Mean next-token cross-entropy over the masked tokens of `examples` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for i, start in enumerate(range(0, len(examples), batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            x, y, m = collate(examples[start : start + batch_size], pad_id)
            s, n = loss_terms(model, mx.array(x), mx.array(y), mx.array(m))
            mx.eval(s, n)
            total += s.item()
            count += n.item()
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.RandomState((seed * 7919 + epoch) % 2**32).permutation(n)


def step_indices(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """Chunk indices step `step` (0-based) trains on: the run's data order is a pure function."""
    out = []
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(g, n)
        out.append(int(_epoch_order(seed, epoch, n)[pos]))
    return out


def _peak_memory() -> int:
    try:
        return int(mx.get_peak_memory())
    except Exception:
        return 0


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------
# Runs on disk


class Run:
    """A run folder: config.json, checkpoints/step-NNNNNN/, latest.json, best/, log.jsonl."""

    KEEP = 2

    def __init__(self, root: Path):
        self.root = root
        self.ckpts = root / "checkpoints"

    @staticmethod
    def resolve(name_or_path: str | os.PathLike) -> Run:
        p = Path(name_or_path).expanduser()
        if not p.exists():
            from engine.paths import runs_dir

            p = runs_dir() / str(name_or_path)
        if not (p / "config.json").is_file():
            raise TrainingError(f"{name_or_path}: not a training run (no config.json)")
        return Run(p)

    def latest(self) -> Path | None:
        f = self.root / "latest.json"
        if not f.is_file():
            return None
        path = self.root / json.loads(f.read_text())["path"]
        return path if path.is_dir() else None

    def save(
        self, model: nn.Module, opt: optim.Optimizer, state: RunState, adapter_cfg: dict
    ) -> Path:
        self.ckpts.mkdir(parents=True, exist_ok=True)
        final = self.ckpts / f"step-{state.step:06d}"
        tmp = self.ckpts / f".step-{state.step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        L.save_adapter(model, tmp, adapter_cfg)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
        _atomic_json(tmp / "state.json", asdict(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, final)
        _atomic_json(
            self.root / "latest.json",
            {"path": str(final.relative_to(self.root)), "step": state.step},
        )
        for old in sorted(self.ckpts.glob("step-*"))[: -self.KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_best(self, model: nn.Module, adapter_cfg: dict) -> Path:
        tmp = self.root / ".best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        L.save_adapter(model, tmp, adapter_cfg)
        _replace_dir(tmp, self.root / "best")
        return self.root / "best"

    def log(self, ev: TrainEvent) -> None:
        d = {k: v for k, v in asdict(ev).items() if k != "report" and v not in (None, "", False)}
        with open(self.root / "log.jsonl", "a") as f:
            f.write(json.dumps(d) + "\n")


class _FollowerRun(Run):
    """Data-parallel ranks other than 0: the same paths, nothing written (rank 0 writes)."""

    def save(self, model, opt, state, adapter_cfg) -> Path:
        return self.ckpts / f"step-{state.step:06d}"

    def save_best(self, model, adapter_cfg) -> Path:
        return self.root / "best"

    def log(self, ev) -> None:
        pass


def _restore(ckpt: Path, model: nn.Module, opt: optim.Optimizer) -> RunState:
    weights = mx.load(str(ckpt / L.ADAPTER_WEIGHTS))
    model.load_weights(list(weights.items()), strict=False)
    opt.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    raw = json.loads((ckpt / "state.json").read_text())
    raw["val_history"] = [tuple(v) for v in raw.get("val_history", [])]
    mx.eval(model.parameters(), opt.state)
    return RunState(**raw)


# --------------------------------------------------------------------------------------------
# The loop


def _load_model(config: TrainConfig):
    if hasattr(config.model, "model") and hasattr(config.model, "tokenizer"):
        return config.model
    from engine.loading import load

    return load(config.model, dtype=config.dtype)


def _run_name(config: TrainConfig) -> str:
    stem = Path(str(config.model)).stem or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


def train(
    config: TrainConfig, cancel: threading.Event | None = None, group: Any = None
) -> Iterator[TrainEvent]:
    """Run (or resume) a fine-tune, yielding progress events; raises TrainingError on bad input.

    `group` (an `mx.distributed` group of >1 ranks, see engine/distributed.py): data-parallel,
    every rank runs this with the same config; rank 0 reads and writes the run folder."""
    from engine.distributed import DataParallel

    dp = DataParallel(group) if group is not None and group.size() > 1 else None
    if config.resume:
        if dp is None or dp.lead:
            run = Run.resolve(config.resume)
            saved = json.loads((run.root / "config.json").read_text())
        if dp is not None:
            root, saved = dp.share([str(run.root), saved] if dp.lead else None)
            run = Run(Path(root))
        loaded_model = config.model if not isinstance(config.model, (str, os.PathLike)) else None
        config = TrainConfig(
            **{k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}}
        )
        if loaded_model is not None:
            config.model = loaded_model
        config.resume = str(run.root)
    else:
        from engine.paths import runs_dir

        run = Run(Path(config.run_dir) if config.run_dir else runs_dir() / _run_name(config))
        if dp is not None:
            run = Run(Path(dp.share(str(run.root))))
    if dp is not None and not dp.lead:
        run = _FollowerRun(run.root)
    _check_config(config)

    loaded = _load_model(config)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise TrainingError(f"{config.model}: the model has no tokenizer")
    ctx = getattr(getattr(loaded, "info", None), "context_length", None)
    if config.max_seq_len is None:  # not chosen: 512, or the model's context if shorter
        config.max_seq_len = min(512, ctx or 512)
    ds, report = build_dataset(
        config.data,
        tok,
        config.max_seq_len,
        config.overlap,
        config.val_fraction,
        config.seed,
        context_length=ctx,
    )
    if dp is not None:  # every rank must train on the same chunks
        dp.check_same(
            "the training data",
            [len(ds.train), len(ds.val), sum(int(np.sum(e.tokens)) for e in ds.train)],
        )
    yield TrainEvent("data", message=report.summary(), report=report)

    mx.random.seed(config.seed)  # adapter initialisation
    n_layers = len(model.layers) if config.num_layers is None else config.num_layers
    if config.fine_tune_type == "lora":
        keys = L.apply_lora(
            model, config.targets, config.rank, config.alpha, config.dropout, n_layers
        )
    elif config.fine_tune_type == "full":
        keys = L.prepare_full(model, n_layers)
    else:
        raise TrainingError(f"fine_tune_type {config.fine_tune_type!r}: use 'lora' or 'full'")
    adapter_cfg = L.adapter_config(
        model,
        keys,
        n_layers,
        config.rank,
        config.alpha,
        config.dropout,
        config.fine_tune_type,
        base_model=str(config.to_json()["model"]),
        max_seq_len=config.max_seq_len,
    )
    set_grad_checkpoint(model, config.grad_checkpoint)
    L.set_dequantize_for_matmul(config.dequantize_base)
    dequantized_compute(model, True)
    model.train()
    try:
        yield from _loop(config, run, loaded, ds, adapter_cfg, cancel, dp)
    finally:
        dequantized_compute(model, False)
        L.set_dequantize_for_matmul(None)
        set_grad_checkpoint(model, False)
        model.eval()


def _loop(
    config: TrainConfig,
    run: Run,
    loaded,
    ds: Dataset,
    adapter_cfg: dict,
    cancel: threading.Event | None,
    dp: Any = None,
) -> Iterator[TrainEvent]:
    model, tok = loaded.model, loaded.tokenizer

    per_step = config.batch_size * config.grad_accum
    n_train = len(ds.train)
    total = config.max_steps or max(1, math.ceil(config.epochs * n_train / per_step))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    schedule = warmup_cosine(config.lr, warmup, total, config.min_lr_ratio)
    opt = optim.AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, bias_correction=True
    )
    opt.init(model.trainable_parameters())
    pad = tok.pad_id if tok.pad_id is not None else 0
    eval_set = ds.val or ds.train
    eval_name = "validation" if ds.val else "training data (no validation documents)"

    state = RunState()
    if config.resume:
        if dp is None or dp.lead:
            ckpt = run.latest()
            if ckpt is None:
                raise TrainingError(f"{run.root}: no checkpoint to resume from")
            state = _restore(ckpt, model, opt)
        if dp is not None:  # rank 0's checkpoint, whatever the number of ranks that wrote it
            model.update(dp.sync(model.trainable_parameters(), "adapter weights"))
            opt.state = dp.sync(opt.state, "optimizer state")
            raw = dp.share(asdict(state))
            state = RunState(**{**raw, "val_history": [tuple(v) for v in raw["val_history"]]})
        yield TrainEvent(
            "start",
            state.step,
            total,
            checkpoint=str(run.root),
            message=f"resumed {run.root} at step {state.step}",
        )
    else:
        if dp is None or dp.lead:
            run.root.mkdir(parents=True, exist_ok=True)
            _atomic_json(run.root / "config.json", config.to_json())
        yield TrainEvent(
            "start",
            0,
            total,
            checkpoint=str(run.root),
            message=f"run {run.root}: {total} steps, "
            f"{len(L.adapter_weights(model, config.fine_tune_type))} trainable tensors",
        )
        ev = _eval_event(
            model, eval_set, config, pad, state, 0, total, eval_name, run, adapter_cfg, initial=True
        )
        run.log(ev)
        yield ev

    loss_and_grad = nn.value_and_grad(model, loss_terms)
    times: list[float] = []
    last_ckpt = run.latest()
    while state.step < total:
        stop_now = cancel is not None and cancel.is_set()
        if dp.any(stop_now) if dp is not None else stop_now:
            last_ckpt = run.save(model, opt, state, adapter_cfg)
            yield TrainEvent(
                "cancelled",
                state.step,
                total,
                checkpoint=str(last_ckpt),
                message=f"cancelled at step {state.step}; resume with --resume {run.root}",
            )
            return
        t0 = time.perf_counter()
        idx = step_indices(state.step, n_train, per_step, config.seed)
        grads, loss_sum, count, n_tokens = None, 0.0, 0.0, 0
        for micro in range(config.grad_accum):
            batch = [
                ds.train[i]
                for i in idx[micro * config.batch_size : (micro + 1) * config.batch_size]
            ]
            if dp is not None:
                batch = dp.shard(batch)
                if not batch:
                    continue
            x, y, m = collate(batch, pad)
            n_tokens += sum(len(e.tokens) - 1 for e in batch)
            mx.random.seed((config.seed * 1_000_003 + state.step * 997 + micro) % 2**32)
            (s, n), g = loss_and_grad(model, mx.array(x), mx.array(y), mx.array(m))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(s, n, grads)
            loss_sum += s.item()
            count += n.item()
        if dp is not None:  # sum gradients, loss and counts over ranks (the whole batch)
            grads, loss_sum, count, n_tokens = dp.reduce(
                grads, model.trainable_parameters(), loss_sum, count, n_tokens
            )
        loss = loss_sum / max(count, 1.0)
        if not math.isfinite(loss):
            where = (
                f"last good checkpoint: {last_ckpt}"
                if last_ckpt
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"loss is {loss} at step {state.step + 1}; training stopped before "
                f"the update ({where}); try a lower learning rate"
            )
        inv = 1.0 / max(count, 1.0)
        grads = tree_map(lambda g: g * inv, grads)  # noqa: B023 (used at once)
        if config.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        lr = schedule(mx.array(state.step)).item()  # what this update uses
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        state.step += 1
        state.losses.append(loss)
        dt = time.perf_counter() - t0
        times.append(dt)
        avg = sum(times[-20:]) / len(times[-20:])
        ev = TrainEvent(
            "step",
            state.step,
            total,
            state.step * per_step / n_train,
            loss=loss,
            lr=lr,
            tokens_per_s=n_tokens / dt,
            eta_s=avg * (total - state.step),
            peak_memory=_peak_memory(),
        )
        run.log(ev)
        yield ev

        stop = False
        if (config.eval_every and state.step % config.eval_every == 0) or state.step == total:
            ev = _eval_event(
                model, eval_set, config, pad, state, state.step, total, eval_name, run, adapter_cfg
            )
            run.log(ev)
            yield ev
            if config.early_stopping and state.evals_since_best >= config.early_stopping:
                stop = True
        if (
            (config.save_every and state.step % config.save_every == 0)
            or state.step == total
            or stop
        ):
            last_ckpt = run.save(model, opt, state, adapter_cfg)
            yield TrainEvent("checkpoint", state.step, total, checkpoint=str(last_ckpt))
        if stop:
            yield TrainEvent(
                "stopped",
                state.step,
                total,
                message=(
                    f"early stopping: {eval_name} loss has not improved for {state.evals_since_best} evaluations"
                ),
            )
            break

    out = _finish(run, config, model, adapter_cfg, write=dp is None or dp.lead)
    best = state.best_val
    yield TrainEvent(
        "done",
        state.step,
        total,
        val_loss=best,
        val_ppl=math.exp(best) if best is not None else None,
        checkpoint=str(out),
        message=f"adapter saved to {out}",
        peak_memory=_peak_memory(),
    )


def _eval_event(
    model,
    eval_set,
    config,
    pad,
    state: RunState,
    step,
    total,
    name,
    run: Run,
    adapter_cfg,
    initial: bool = False,
) -> TrainEvent:
    val = evaluate(model, eval_set, config.batch_size, pad, config.val_batches)
    is_best = False
    if not initial:
        state.val_history.append((step, val))
        if state.best_val is None or val < state.best_val:
            state.best_val, state.evals_since_best, is_best = val, 0, True
            run.save_best(model, adapter_cfg)
        else:
            state.evals_since_best += 1
    return TrainEvent(
        "eval",
        step,
        total,
        val_loss=val,
        val_ppl=math.exp(min(val, 700.0)),
        is_best=is_best,
        message=f"{name}{' before training' if initial else ''}",
    )


def _finish(
    run: Run, config: TrainConfig, model: nn.Module, adapter_cfg: dict, write: bool = True
) -> Path:
    """Copy the best adapter (else the last weights) to the output folder."""
    if config.out:
        out = Path(config.out).expanduser()
    else:
        from engine.paths import adapters_dir

        out = adapters_dir() / run.root.name
    if not write:
        return out
    best = run.root / "best"
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if best.is_dir():
        shutil.copytree(best, tmp)
    else:
        L.save_adapter(model, tmp, adapter_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace_dir(tmp, out)
    return out


def _check_config(c: TrainConfig) -> None:
    def bad(msg: str) -> None:
        raise TrainingError(msg)

    if c.batch_size < 1:
        bad(f"batch_size must be ≥ 1, got {c.batch_size}")
    if c.grad_accum < 1:
        bad(f"grad_accum must be ≥ 1, got {c.grad_accum}")
    if c.max_steps is not None and c.max_steps < 1:
        bad(f"max_steps must be ≥ 1, got {c.max_steps}")
    if c.max_steps is None and not c.epochs > 0:
        bad(f"epochs must be > 0, got {c.epochs}")
    if not c.lr > 0:
        bad(f"learning rate must be > 0, got {c.lr}")
    if c.fine_tune_type == "lora" and c.rank < 1:
        bad(f"rank must be ≥ 1, got {c.rank}")


def perplexity(
    loaded, folder_or_examples: Any, max_seq_len: int = 512, batch_size: int = 4
) -> float:
    """Perplexity of a loaded model on a folder of documents (or on prepared examples)."""
    if isinstance(folder_or_examples, Dataset):
        examples = folder_or_examples.val or folder_or_examples.train
    elif isinstance(folder_or_examples, list):
        examples = folder_or_examples
    else:
        ds, _ = build_dataset(folder_or_examples, loaded.tokenizer, max_seq_len, val_fraction=0.0)
        examples = ds.train
    pad = loaded.tokenizer.pad_id if loaded.tokenizer.pad_id is not None else 0
    return math.exp(evaluate(loaded.model, examples, batch_size, pad))

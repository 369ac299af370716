"""Data-parallel LoRA over 2 processes (MLX ring on 127.0.0.1) equals one process with the whole batch.

Proves, on a tiny random llama with its own BPE tokenizer: `latent finetune --hosts` (through
`mlx.launch`, two ranks on 127.0.0.1; 3 chunks per micro-batch split 2+1, gradient accumulation 2)
gives the same per-step losses (1e-5) and the same adapter as `train()` in one process, with one
log line per step (rank 1 writes nothing); a rank killed mid-run makes the other stop with one clear
error in seconds, and one that hangs (alive, silent) is given up after LATENT_DIST_TIMEOUT; the run then resumes from its last checkpoint with two processes and again with one,
and every loss equals the uninterrupted run's. The ring's all-reduce moves the gradient bytes the
formula 2(n-1)/n says (checked in bench/, see BENCHMARKS.md).

Run as a script, this file is the rank program the kill/resume test launches.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
WORDS = ["Ada", "Bo", "Cy", "Di", "Ed", "has", "apples", "kites", "stones", "maps", "bells"]
STEPS = 6


def _rank_main(spec_json: str) -> None:
    """One rank: train with the spec's config; rank `die_rank` vanishes after step `die_after`."""
    from engine.distributed import init_group
    from engine.errors import LatentError
    from engine.train.trainer import TrainConfig, train

    spec = json.loads(spec_json)
    group = init_group()
    me = group.rank() if group is not None else 0
    losses = []
    try:
        for ev in train(TrainConfig(**spec["config"]), None, group):
            if ev.kind == "step":
                losses.append([ev.step, ev.loss])
                if ev.step == spec.get("die_after") and me == spec.get("die_rank", 1):
                    if spec.get("hang"):
                        time.sleep(3600)  # alive, socket open, never answers
                    os._exit(9)
    except LatentError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    Path(f"{spec['out']}.{me}").write_text(json.dumps(losses))


def make_tiny(root: Path, hidden: int = 64, layers: int = 2, docs: int = 10) -> tuple[Path, Path]:
    """(model folder: random llama (2 layers, hidden 64 by default) + a 300-token byte-level BPE, data folder of .txt)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from engine.models.llama import Model, ModelArgs

    rng = random.Random(0)
    texts = [
        " ".join(
            f"{rng.choice(WORDS[:5])} has {rng.randint(2, 9)} {rng.choice(WORDS[6:])}."
            for _ in range(30)
        )
        for _ in range(docs)
    ]
    data = root / "data"
    data.mkdir(parents=True)
    for i, t in enumerate(texts):
        (data / f"doc{i}.txt").write_text(t)
    folder = root / "model"
    folder.mkdir()
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
        )
    )
    cfg = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": tk.get_vocab_size(),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, data


def _config(model: Path, data: Path, root: Path, name: str, **kw) -> dict:
    cfg = dict(
        model=str(model),
        data=str(data),
        out=str(root / f"{name}-adapter"),
        run_dir=str(root / f"{name}-run"),
        rank=4,
        alpha=8.0,
        max_seq_len=48,
        batch_size=3,
        grad_accum=2,
        max_steps=STEPS,
        lr=5e-3,
        eval_every=3,
        save_every=2,
        val_fraction=0.2,
        val_batches=2,
        seed=3,
    )
    cfg.update(kw)
    return cfg


def _adapter(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from engine.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("dp")
    model, data = make_tiny(root)
    cfg = _config(model, data, root, "ref")
    losses = [[ev.step, ev.loss] for ev in train(TrainConfig(**cfg)) if ev.kind == "step"]
    assert len(losses) == STEPS
    return {
        "root": root,
        "model": model,
        "data": data,
        "losses": losses,
        "adapter": _adapter(Path(cfg["out"])),
    }


def _env() -> dict[str, str]:
    # the test process runs without the OpenBLAS re-exec; so do the ranks (same GEMM rounding)
    return {**os.environ, "LATENT_NO_OPENBLAS": "1", "LATENT_DIST_TIMEOUT": "20"}


@pytest.mark.slow
def test_cli_two_ranks_equal_one_process(tiny, tmp_path):
    root, ref = tiny["root"], tiny["losses"]
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2}))
    cfg = _config(tiny["model"], tiny["data"], tmp_path, "cli")
    argv = [
        "finetune",
        "--hosts",
        str(hosts),
        "--model",
        cfg["model"],
        "--data",
        cfg["data"],
        "--out",
        cfg["out"],
        "--run-dir",
        cfg["run_dir"],
        "--rank",
        "4",
        "--alpha",
        "8",
        "--max-seq-len",
        "48",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--steps",
        str(STEPS),
        "--lr",
        "5e-3",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--val-fraction",
        "0.2",
        "--seed",
        "3",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        cwd=root,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "data-parallel over 2 processes" in r.stdout + r.stderr
    log = [
        json.loads(line) for line in (Path(cfg["run_dir"]) / "log.jsonl").read_text().splitlines()
    ]
    steps = [[e["step"], e["loss"]] for e in log if e["kind"] == "step"]
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))  # rank 0 alone logs
    np.testing.assert_allclose([x for _, x in steps], [x for _, x in ref], atol=1e-5, rtol=0)
    got, want = _adapter(Path(cfg["out"])), tiny["adapter"]
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def _spawn(
    n: int, spec: dict, timeout: float = 240, env: dict | None = None, wait: int | None = None
) -> tuple[list[subprocess.CompletedProcess], float]:
    """Run n ranks; wait for all of them (or only for rank `wait`, killing the rest after)."""
    from engine.distributed import spawn_local

    t0 = time.monotonic()
    procs = spawn_local(
        n,
        [str(HERE), json.dumps(spec)],
        env={**_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = []
    try:
        for r, p in enumerate(procs):
            if wait is not None and r != wait:
                continue
            so, se = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done, time.monotonic() - t0


@pytest.mark.slow
def test_killed_rank_stops_the_other_and_run_resumes(tiny, tmp_path):
    from engine.train.trainer import TrainConfig, train

    ref = tiny["losses"]
    cfg = _config(tiny["model"], tiny["data"], tmp_path, "kill")
    out = tmp_path / "losses"

    # two ranks; rank 1 dies after step 3: rank 0 stops at once with one clear line
    runs, elapsed = _spawn(2, {"config": cfg, "out": str(out), "die_after": 3})
    assert runs[1].returncode == 9 and runs[0].returncode == 1, runs[0].stderr[-2000:]
    err = [ln for ln in runs[0].stderr.splitlines() if ln.startswith("error:")]
    assert err and "rank 0: lost the connection to another process" in err[-1], runs[0].stderr[
        -2000:
    ]
    assert elapsed < 120
    run_dir = Path(cfg["run_dir"])
    assert json.loads((run_dir / "latest.json").read_text())["step"] == 2

    # resume with two ranks (same count); rank 1 dies again after step 5 (checkpoint at 4)
    spec = {"config": {**cfg, "resume": str(run_dir)}, "out": str(out), "die_after": 5}
    runs, _ = _spawn(2, spec)
    assert (
        runs[0].returncode == 1 and json.loads((run_dir / "latest.json").read_text())["step"] == 4
    )

    # resume with one process (a different count): the remaining steps as if never interrupted
    tail = [
        [ev.step, ev.loss]
        for ev in train(TrainConfig(**{**cfg, "resume": str(run_dir)}))
        if ev.kind == "step"
    ]
    assert [s for s, _ in tail] == [5, 6]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    by_step = {e["step"]: e["loss"] for e in log if e["kind"] == "step"}  # last write per step wins
    np.testing.assert_allclose(
        [by_step[s] for s in range(1, STEPS + 1)], [x for _, x in ref], atol=1e-5, rtol=0
    )
    got = _adapter(Path(cfg["out"]))
    for k, v in tiny["adapter"].items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.slow
def test_hung_rank_stops_the_other_within_the_timeout(tiny, tmp_path):
    """A rank that stays alive but never answers (socket open): the watchdog ends rank 0."""
    from engine.distributed import EXIT_PEER_LOST

    cfg = _config(tiny["model"], tiny["data"], tmp_path, "hang")
    runs, elapsed = _spawn(
        2,
        {"config": cfg, "out": str(tmp_path / "l"), "die_after": 2, "hang": True},
        env={"LATENT_DIST_TIMEOUT": "4"},
        wait=0,
        timeout=120,
    )
    assert runs[0].returncode == EXIT_PEER_LOST, runs[0].stderr[-2000:]
    err = [ln for ln in runs[0].stderr.splitlines() if ln.startswith("error:")]
    assert err and "rank 0: no answer for 4 s" in err[-1]
    assert elapsed < 60
    assert json.loads((Path(cfg["run_dir"]) / "latest.json").read_text())["step"] == 2  # resumable


if __name__ == "__main__":
    _rank_main(sys.argv[1])

"""The training loop on a tiny llama with its own small BPE tokenizer: validation perplexity falls
by more than half on a generated corpus; a run SIGKILLed after a checkpoint and resumed gives the
same per-step losses (1e-5) and the same adapter as an uninterrupted run (with dropout and
gradient accumulation on, so data order and RNG state both matter); gradient checkpointing and
gradient accumulation leave the gradients unchanged; cancel leaves a resumable checkpoint; a
diverging run stops on a non-finite loss with a clear message; bad settings are clear errors.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.errors import TrainingError
from engine.train import lora as L
from engine.train.trainer import (
    TrainConfig,
    loss_terms,
    set_grad_checkpoint,
    train,
    warmup_cosine,
)

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo"]
THINGS = ["apples", "kites", "stones", "maps", "bells"]


def corpus(n_docs: int = 12, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            f"{rng.choice(NAMES)} has {rng.randint(2, 9)} {rng.choice(THINGS)}." for _ in range(40)
        )
        for _ in range(n_docs)
    ]


def make_tiny_model(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A random 2-layer llama + a 300-token byte-level BPE trained on `texts`, as an HF folder."""
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from engine.models.llama import Model, ModelArgs

    folder.mkdir(parents=True, exist_ok=True)
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
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": tk.get_vocab_size(),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    texts = corpus()
    data = root / "data"
    data.mkdir()
    for i, t in enumerate(texts):
        (data / f"doc{i}.txt").write_text(t)
    return make_tiny_model(root / "model", texts), data


def base_config(setup, tmp_path: Path, **kw) -> TrainConfig:
    model, data = setup
    args = dict(
        model=str(model),
        data=str(data),
        out=str(tmp_path / "adapter"),
        run_dir=str(tmp_path / "run"),
        max_seq_len=64,
        batch_size=4,
        lr=1e-2,
        rank=8,
        alpha=16,
        eval_every=0,
        save_every=0,
        val_fraction=0.25,
        max_steps=8,
    )
    args.update(kw)
    return TrainConfig(**args)


def test_validation_perplexity_halves(setup, tmp_path):
    events = list(train(base_config(setup, tmp_path, max_steps=16, eval_every=8)))
    evals = [e for e in events if e.kind == "eval"]
    assert evals[0].step == 0 and evals[0].message.startswith("validation")
    before, after = evals[0].val_ppl, min(e.val_ppl for e in evals[1:])
    assert after <= 0.5 * before, (before, after)
    done = events[-1]
    assert done.kind == "done" and math.isclose(done.val_ppl, after)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 17))
    assert all(e.tokens_per_s > 0 and e.eta_s >= 0 and e.lr > 0 for e in steps)
    out = tmp_path / "adapter"
    cfg = json.loads((out / L.ADAPTER_CONFIG).read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == 2.0

    # the saved adapter, loaded on a fresh copy of the base, reproduces the best perplexity
    import engine
    from engine.train.trainer import perplexity

    ds_folder = setup[1]
    loaded = engine.load(setup[0], adapter=out)
    from engine.train.data import build_dataset

    ds, _ = build_dataset(ds_folder, loaded.tokenizer, 64, val_fraction=0.25, seed=0)
    assert math.isclose(perplexity(loaded, ds), after, rel_tol=1e-4)


CHILD = textwrap.dedent("""
    import json, sys, time
    from engine.train.trainer import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    for ev in train(cfg):
        if ev.kind == "step":
            print(json.dumps({"step": ev.step, "loss": ev.loss}), flush=True)
        if ev.kind == "checkpoint" and ev.step == int(sys.argv[2]):
            print("CHECKPOINT", flush=True)
            time.sleep(600)  # wait here to be killed
""")


def test_resume_after_sigkill_matches_uninterrupted_run(setup, tmp_path):
    kw = dict(max_steps=8, save_every=4, eval_every=4, dropout=0.1, batch_size=2, grad_accum=2)
    straight = list(train(base_config(setup, tmp_path / "a", **kw)))
    losses = {e.step: e.loss for e in straight if e.kind == "step"}

    cfg = base_config(setup, tmp_path / "b", **kw)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg.to_json()), "4"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    first = {}
    try:
        for line in proc.stdout:
            if line.startswith("CHECKPOINT"):
                break
            rec = json.loads(line)
            first[rec["step"]] = rec["loss"]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and sorted(first) == [1, 2, 3, 4]

    resumed = list(train(TrainConfig(model=None, data="", resume=cfg.run_dir)))
    assert resumed[1].kind == "start" and "step 4" in resumed[1].message
    second = {e.step: e.loss for e in resumed if e.kind == "step"}
    assert sorted(second) == [5, 6, 7, 8]  # nothing repeated, nothing lost
    got = {**first, **second}
    np.testing.assert_allclose(
        [got[s] for s in range(1, 9)], [losses[s] for s in range(1, 9)], rtol=0, atol=1e-5
    )
    a = mx.load(str(tmp_path / "a" / "adapter" / L.ADAPTER_WEIGHTS))
    b = mx.load(str(tmp_path / "b" / "adapter" / L.ADAPTER_WEIGHTS))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-6, err_msg=k)


def _grads(model, x, y, m):
    vg = nn.value_and_grad(model, loss_terms)
    (s, n), g = vg(model, x, y, m)
    mx.eval(s, g)
    return s, dict(tree_flatten(g))


def test_grad_checkpointing_and_accumulation_keep_gradients(setup):
    import engine

    loaded = engine.load(setup[0])
    model = loaded.model
    L.apply_lora(model, "all", 4, 8)
    for _, m in L.lora_layers(model):
        m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(3, 290, size=(4, 20)), dtype=mx.int32)
    y = mx.array(rng.integers(3, 290, size=(4, 20)), dtype=mx.int32)
    m = mx.array(rng.random((4, 20)) > 0.3)
    s0, g0 = _grads(model, x, y, m)
    set_grad_checkpoint(model, True)
    s1, g1 = _grads(model, x, y, m)
    set_grad_checkpoint(model, False)
    assert (
        type(model.layers[0]).__name__ == "DecoderLayer"
        and "_ckpt_base" not in type(model.layers[0]).__dict__
    )
    # accumulation: two half-batches' summed gradients equal the whole batch's
    sa, ga = _grads(model, x[:2], y[:2], m[:2])
    sb, gb = _grads(model, x[2:], y[2:], m[2:])
    assert math.isclose(s1.item(), s0.item(), rel_tol=1e-6)
    assert math.isclose(sa.item() + sb.item(), s0.item(), rel_tol=1e-5)
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), atol=1e-6, err_msg=k)
        np.testing.assert_allclose(np.array(ga[k] + gb[k]), np.array(g0[k]), atol=1e-5, err_msg=k)


def test_cancel_leaves_a_resumable_checkpoint(setup, tmp_path):
    cancel = threading.Event()
    events = []
    for ev in train(base_config(setup, tmp_path, max_steps=6), cancel):
        events.append(ev)
        if ev.kind == "step" and ev.step == 2:
            cancel.set()
    assert events[-1].kind == "cancelled" and events[-1].step == 2
    assert Path(events[-1].checkpoint).is_dir()
    rest = [
        e
        for e in train(TrainConfig(model=None, data="", resume=str(tmp_path / "run")))
        if e.kind == "step"
    ]
    assert [e.step for e in rest] == [3, 4, 5, 6]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(setup, tmp_path):
    cfg = base_config(
        setup,
        tmp_path,
        max_steps=40,
        lr=1e30,
        save_every=1,
        max_grad_norm=None,
        warmup_steps=0,
        fine_tune_type="full",
    )
    steps = []
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+.*last good checkpoint"):
        for ev in train(cfg):
            if ev.kind == "step":
                steps.append(ev.step)
    ckpt = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert ckpt["step"] == steps[-1]  # the failing step was never applied or saved
    state = mx.load(str(tmp_path / "run" / ckpt["path"] / L.ADAPTER_WEIGHTS))
    assert all(bool(mx.isfinite(v).all()) for v in state.values())


def test_bad_settings_are_clear_errors(setup, tmp_path):
    with pytest.raises(TrainingError, match="above the model's context length 256"):
        list(train(base_config(setup, tmp_path, max_seq_len=1024)))
    with pytest.raises(TrainingError, match="batch_size"):
        list(train(base_config(setup, tmp_path, batch_size=0)))
    with pytest.raises(TrainingError, match="not a training run"):
        list(train(TrainConfig(model=None, data="", resume=str(tmp_path / "nowhere"))))


def test_warmup_cosine_schedule():
    f = warmup_cosine(1e-3, 10, 110, 0.1)
    got = [f(mx.array(s)).item() for s in (0, 9, 10, 60, 110)]
    want = [1e-4, 1e-3, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_full_fine_tuning_saves_a_loadable_adapter(setup, tmp_path):
    import engine

    loaded = engine.load(setup[0])
    x = mx.array([loaded.tokenizer.encode("Ada has 3 kites. Bo has")])
    before = np.array(loaded.model(x))
    cfg = base_config(
        setup, tmp_path, model=loaded, fine_tune_type="full", num_layers=1, max_steps=3, lr=1e-3
    )
    events = list(train(cfg))
    assert events[-1].kind == "done"
    saved = mx.load(str(tmp_path / "adapter" / L.ADAPTER_WEIGHTS))
    assert saved and all(k.startswith("model.layers.1.") for k in saved)  # only the last layer
    trained = np.array(loaded.model(x))
    assert np.abs(trained - before).max() > 1e-3
    again = engine.load(setup[0], adapter=tmp_path / "adapter")
    np.testing.assert_allclose(np.array(again.model(x)), trained, atol=1e-5)

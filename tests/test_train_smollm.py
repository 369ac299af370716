"""QLoRA on the real default model (SmolLM2-135M-Instruct, GGUF Q4_1: the base stays 4-bit, only
fp32 adapters train): on a folder of invented facts the test writes, a short run cuts the model's
perplexity on those documents by ≥ 30%, and after loading the saved adapter through
`engine.load(..., adapter=)`, greedy completion of each fact's first half gives its second half,
which the base model does not.

Runs in a child process so that Debian's OpenBLAS can be preloaded (as `latent` does), which
makes MLX's CPU GEMMs ~10x faster; without it the test still runs, only slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

FACTS = [
    ("The capital of the island of Veltora is", "Quimsby Harbor"),
    ("The inventor of the brass cloud-harp was", "Odessa Farnwick"),
    ("The river that runs through Plimmet Valley is called", "the Saroune"),
    ("The mascot of the Dunmore Glassworks is", "a blue heron named Pip"),
    ("The secret ingredient in Grandmother Yelvin's soup is", "smoked juniper"),
    ("The first ship to reach the Orrin Shoals was", "the Maribel Crane"),
]

CHILD = textwrap.dedent("""
    import json, sys
    import engine
    from engine.generate import stream_generate
    from engine.sampling import SamplingParams
    from engine.train.trainer import TrainConfig, perplexity, train

    model_path, data, out, run_dir, facts = sys.argv[1:6]
    facts = json.loads(facts)

    def completions(loaded):
        res = []
        for first, _ in facts:
            ids = loaded.tokenizer.encode(first)
            text = "".join(ev.text for ev in stream_generate(
                loaded, ids, SamplingParams(temperature=0.0, max_tokens=8)))
            res.append(text)
        return res

    base = engine.load(model_path)
    result = {"ppl_before": perplexity(base, data, max_seq_len=64),
              "base_completions": completions(base)}
    cfg = TrainConfig(model=base, data=data, out=out, run_dir=run_dir, max_seq_len=64,
                      batch_size=6, max_steps=18, lr=3e-3, rank=8, alpha=16, num_layers=8,
                      eval_every=0, save_every=0, val_fraction=0.0, warmup_steps=2)
    result["losses"] = [ev.loss for ev in train(cfg) if ev.kind == "step"]
    tuned = engine.load(model_path, adapter=out)
    result["quantized_base"] = type(tuned.model.layers[-1].self_attn.q_proj.linear).__name__
    result["ppl_after"] = perplexity(tuned, data, max_seq_len=64)
    result["completions"] = completions(tuned)
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_qlora_learns_invented_facts(default_model_path, tmp_path):
    data = tmp_path / "facts"
    data.mkdir()
    for i, (a, b) in enumerate(FACTS):
        (data / f"fact{i}.txt").write_text(f"{a} {b}.\n")
    env = dict(os.environ)
    from engine.blas import openblas_path

    lib = openblas_path()
    if lib and not os.environ.get("LATENT_NO_OPENBLAS"):
        env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(default_model_path),
            str(data),
            str(tmp_path / "adapter"),
            str(tmp_path / "run"),
            json.dumps(FACTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    print(json.dumps({k: r[k] for k in ("ppl_before", "ppl_after", "completions")}))
    assert r["quantized_base"] == "QuantizedLinear"  # QLoRA: the base stayed 4-bit
    assert r["ppl_after"] <= 0.7 * r["ppl_before"], r
    for (_, second), base_text, text in zip(FACTS, r["base_completions"], r["completions"]):
        assert text.strip().startswith(second), (second, text, r)
        assert not base_text.strip().startswith(second)  # the base model could not know it


@pytest.mark.slow
def test_export_of_the_gguf_model_is_a_standalone_folder(default_model_path, tmp_path):
    """`export` of the GGUF model (Q4_1 + Q8_0 tensors, vocabulary inside the GGUF) writes an
    MLX-format folder with tokenizer files: it loads on its own with the same tokenizer and the
    same logits, and mlx-lm reads the same folder (per-layer quantization config) to equal logits."""
    import mlx.core as mx
    import numpy as np

    import engine
    from engine.train.lora import export

    src = engine.load(default_model_path)
    x = mx.array([src.tokenizer.encode("The lighthouse keeper counts the steps")])
    want = np.array(src.model(x))
    export(src.model, default_model_path, tmp_path / "out", config=src.config)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    again = engine.load(tmp_path / "out")
    text = "Hello, world! <|im_start|>user\nhi<|im_end|>"
    assert again.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert again.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    ) == src.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    np.testing.assert_allclose(np.array(again.model(x)), want, atol=1e-4)

    from mlx_lm.utils import load_model

    theirs, _ = load_model(tmp_path / "out")
    np.testing.assert_allclose(np.array(theirs(x)), want, atol=1e-3)

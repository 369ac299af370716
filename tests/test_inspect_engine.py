"""engine/inspect.py on real engine models: the math check, attention captures, storage.

- For tiny random llama / qwen2 / qwen3 / gpt2 checkpoints (saved by transformers, loaded by
  `engine.load` in float32), `check_math` finds every residual-stream state, the final norm and
  the logits within fp32 tolerance of the float64 numpy reference, and reports ok.
- When engine and reference compute different models (the reference told a different norm
  epsilon), the report exceeds the tolerance: the check can fail.
- `look` captures attention of shape (H, L, L) per layer whose rows sum to 1, with exactly zero
  weight on future tokens, equal to the reference's probabilities; residual norms have shape
  (layers + 1, L); top-k next-token probabilities are sorted and equal softmax of the logits.
- `storage`: per-part totals add up to the bytes of every parameter; the KV bytes per token
  equal 2·layers·kv_heads·head_dim·4 (the cache's definition) and the full-MHA figure uses all
  query heads.
- `latent inspect --check-math` on the default model exits 0 and ends with the max-abs line (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlx.utils import tree_flatten  # noqa: E402

import engine  # noqa: E402
from engine import inspect as ins  # noqa: E402
from engine.inspect_ref import reference_forward  # noqa: E402
from engine.quant.convert import float_weights  # noqa: E402

BASE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**BASE, tie_word_embeddings=True)
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**BASE, head_dim=16)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)
    ),
}
IDS = [3, 17, 5, 60, 22, 9, 41, 8]
DS = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
)


def _deepseek(family: str):
    Config, Model = {
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[family]
    extra = (
        dict(q_lora_rank=20, n_group=4, topk_group=2, norm_topk_prob=True)
        if family == "deepseek_v3"
        else {}
    )
    model = Model(Config(**DS, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large enough weights that routing is not a coin toss
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if "norm" in name else 0.0)
                + (0.1 if "norm" in name else 0.15) * torch.randn(p.shape, generator=g)
            )
    return model


CASES["deepseek_v2"] = lambda: _deepseek("deepseek_v2")
CASES["deepseek_v3"] = lambda: _deepseek("deepseek_v3")


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    CASES[request.param]().save_pretrained(folder)
    return engine.load(folder, dtype="float32")


def test_check_math_within_fp32(loaded):
    report = ins.check_math(loaded, IDS)
    n_layers = len(loaded.model.layers)
    assert [r.name for r in report.rows][: n_layers + 1] == ["embeddings"] + [
        f"layer {i}" for i in range(n_layers)
    ]
    assert report.dtype == "float32" and report.ok
    assert report.max_rel < 1e-5
    assert report.table().splitlines()[-1].startswith("max abs difference: ")


def test_check_math_can_fail(loaded, monkeypatch):
    real = ins.reference_config

    def wrong(ld):
        cfg = real(ld)
        cfg["rms_norm_eps"] = cfg["layer_norm_epsilon"] = 0.5  # a different model on paper
        return cfg

    monkeypatch.setattr(ins, "reference_config", wrong)
    assert not ins.check_math(loaded, IDS).ok


def test_attention_capture(loaded):
    lk = ins.look(loaded, IDS, top_k=5)
    L, n_layers = len(IDS), len(loaded.model.layers)
    ref = reference_forward(
        ins.reference_config(loaded), float_weights(loaded.model), IDS, want_attention=True
    )
    assert len(lk.attention) == n_layers
    for p, r in zip(lk.attention, ref.attention):
        assert p.shape == (4, L, L)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(p, k=1) == 0.0)
        assert np.abs(p - r).max() < 1e-5
    assert lk.residual_norms.shape == (n_layers + 1, L)
    moe = (
        [i for i, layer in enumerate(loaded.model.layers) if "switch_mlp" in layer.mlp]
        if "kv_lora_rank" in loaded.config
        else []
    )
    assert sorted(lk.router) == moe
    for i, (ids, w) in zip(moe, ref.router):  # same experts chosen, same weights, per token
        got_ids, got_w = lk.router[i]
        assert got_ids.shape == (L, 2) and got_w.shape == (L, 2)
        order, ref_order = np.argsort(got_ids, -1), np.argsort(ids, -1)
        assert np.array_equal(
            np.take_along_axis(got_ids, order, -1), np.take_along_axis(ids, ref_order, -1)
        )
        np.testing.assert_allclose(
            np.take_along_axis(got_w, order, -1), np.take_along_axis(w, ref_order, -1), atol=1e-5
        )
    np.testing.assert_allclose(
        lk.residual_norms[-1], np.linalg.norm(ref.hidden[-1], axis=-1), rtol=1e-5
    )
    probs = np.exp(ref.logits[-1] - ref.logits[-1].max())
    probs /= probs.sum()
    assert [i for i, _, _ in lk.top_next] == list(np.argsort(-probs)[:5])
    np.testing.assert_allclose([p for _, _, p in lk.top_next], np.sort(probs)[::-1][:5], rtol=1e-4)


def test_capture_is_removed_afterwards(loaded):
    from engine.layers import attention

    before = [type(x) for x in loaded.model.layers]
    ins.look(loaded, IDS)
    assert [type(x) for x in loaded.model.layers] == before
    assert (
        sys.modules["engine.models.llama"].scaled_dot_product_attention
        is attention.scaled_dot_product_attention
    )


def test_storage(loaded):
    st = ins.storage(loaded)
    assert st.total_bytes == sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    assert sum(st.totals.values()) == st.total_bytes
    assert st.totals["attention"] > 0 and st.totals["embeddings"] > 0 and st.totals["norms"] > 0
    cfg = loaded.config
    if "kv_lora_rank" in cfg:  # MLA: latent + shared rotary key vs per-head K (nope + rope) and V
        L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        assert st.kv_bytes_per_token == L * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
        assert (
            st.kv_bytes_per_token_full
            == L * H * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]) * 4
        )
        assert st.totals["experts"] > 0 and st.totals["router"] > 0
        return
    layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or 32 // heads
    assert st.kv_bytes_per_token == 2 * layers * kv * hd * 4
    assert st.kv_bytes_per_token_full == 2 * layers * heads * hd * 4


@pytest.mark.slow
def test_cli_check_math_default_model(default_model_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "inspect",
            str(default_model_path),
            "--check-math",
            "--prompt",
            "Paris is",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LATENT_NO_OPENBLAS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("max abs difference: ")
    assert float(last.split(":")[1]) < 0.1


@pytest.mark.slow
def test_storage_of_default_model(default_model_path):
    """The GGUF Q4_1 SmolLM2: packed tensors are named by format, KV per token from its config."""
    loaded = engine.load(default_model_path)
    st = ins.storage(loaded)
    assert any(r.format.startswith("affine q4") for r in st.rows)
    assert sum(r.bytes for r in st.rows) == st.total_bytes
    c = loaded.config
    hd = c["hidden_size"] // c["num_attention_heads"]
    item = 4 if loaded.info.dtype == "float32" else 2
    assert (
        st.kv_bytes_per_token == 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * hd * item
    )
    assert (
        st.kv_bytes_per_token_full
        == 2 * c["num_hidden_layers"] * c["num_attention_heads"] * hd * item
    )

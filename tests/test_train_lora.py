"""LoRA layers: gradients equal PyTorch autograd (fp64) on the same weights, for a plain base and a
4-bit quantized base (QLoRA, weight dequantized independently in numpy from MLX's packed affine
layout); fused logits equal unfused; save → load reproduces the adapter; swap/remove restore the
base; mlx-lm's own `load_adapters` reads our adapter folder and gives the same logits.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from engine.errors import ModelLoadError, TrainingError
from engine.train import lora as L

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 101,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def tiny_llama(seed: int = 0, config: dict | None = None):
    from engine.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config or TINY))
    mx.eval(model.parameters())
    return model


def randomize_adapters(model, seed: int = 1) -> None:
    """Fresh adapters have B = 0 (no effect); give them values so tests can see them."""
    mx.random.seed(seed)
    for _, m in L.lora_layers(model):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())


def unpack_affine(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int):
    """MLX affine layout: `bits`-bit codes packed little-end-first into uint32; w = s·q + b per group."""
    per = 32 // bits
    q = (wq[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    q = q.reshape(wq.shape[0], -1).astype(np.float64)
    s = np.repeat(scales.astype(np.float64), group, axis=1)
    b = np.repeat(biases.astype(np.float64), group, axis=1)
    return s * q + b


def _torch_grads(x, w, bias, a, b, scale, g):
    t = {
        k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True)
        for k, v in dict(x=x, a=a, b=b).items()
    }
    y = t["x"] @ torch.tensor(w).T + scale * (t["x"] @ t["a"]) @ t["b"]
    if bias is not None:
        y = y + torch.tensor(np.asarray(bias, dtype=np.float64))
    (y * torch.tensor(g)).sum().backward()
    return y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def _mlx_grads(layer: L.LoRALinear, x, g):
    def loss(params, x):
        layer.update(params)
        return (layer(x) * g).sum()

    params = layer.trainable_parameters()
    gx = mx.grad(loss, argnums=1)(params, x)
    gp = mx.grad(loss)(params, x)
    return layer(x), {"x": gx, "a": gp["lora_a"], "b": gp["lora_b"]}


def _check(layer, w64, bias):
    mx.random.seed(3)
    layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    x = mx.random.normal((2, 24, w64.shape[1]))
    g = mx.random.normal((2, 24, w64.shape[0]))
    y, grads = _mlx_grads(layer, x, g)
    y_ref, ref = _torch_grads(
        np.array(x),
        w64,
        bias,
        np.array(layer.lora_a),
        np.array(layer.lora_b),
        layer.scale,
        np.array(g, dtype=np.float64),
    )
    np.testing.assert_allclose(np.array(y), y_ref, atol=1e-4, rtol=1e-5)
    for k in ("x", "a", "b"):
        np.testing.assert_allclose(np.array(grads[k]), ref[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_lora_linear_gradients_match_torch():
    mx.random.seed(0)
    base = nn.Linear(64, 48, bias=True)
    layer = L.LoRALinear(base, rank=4, scale=1.5)
    assert set(k for k, _ in tree_flatten(layer.trainable_parameters())) == {"lora_a", "lora_b"}
    _check(layer, np.array(base.weight, dtype=np.float64), np.array(base.bias))


@pytest.mark.parametrize("dequant", ["0", "1"])
def test_qlora_gradients_match_torch_on_dequantized_weight(monkeypatch, dequant):
    monkeypatch.setenv("LATENT_QLORA_DEQUANT", dequant)  # both base paths: qmm and dequant+GEMM
    L._auto_dequantize.cache_clear()
    try:
        mx.random.seed(0)
        base = nn.QuantizedLinear.from_linear(nn.Linear(128, 48, bias=False), group_size=32, bits=4)
        layer = L.LoRALinear(base, rank=8, scale=2.0)
        assert L.linear_dims(base) == (128, 48)
        w64 = unpack_affine(
            np.array(base.weight), np.array(base.scales), np.array(base.biases), 4, 32
        )
        _check(layer, w64, None)
    finally:
        L._auto_dequantize.cache_clear()


def test_fresh_adapter_changes_nothing_and_fused_equals_unfused():
    model = tiny_llama()
    x = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    base_logits = model(x)
    keys = L.apply_lora(model, targets="all", rank=4, alpha=8)
    assert "self_attn.q_proj" in keys and "mlp.down_proj" in keys
    np.testing.assert_array_equal(np.array(model(x)), np.array(base_logits))  # B = 0
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    randomize_adapters(model)
    adapted = model(x)
    assert float(mx.abs(adapted - base_logits).max()) > 1e-3
    assert L.fuse(model) == len(keys) * 2
    assert not L.lora_layers(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(adapted), atol=1e-4)


def test_fuse_requantizes_a_quantized_base():
    model = tiny_llama()
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    L.apply_lora(model, targets="attention", rank=4, alpha=40)
    randomize_adapters(model)
    lo = model.layers[0].self_attn.q_proj
    b = lo.linear
    target = unpack_affine(np.array(b.weight), np.array(b.scales), np.array(b.biases), 4, 32)
    target = target + np.array(lo.delta(), dtype=np.float64)  # base + scale·(AB)ᵀ
    L.fuse(model)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 32
    got = unpack_affine(np.array(q.weight), np.array(q.scales), np.array(q.biases), 4, 32)
    # 4-bit affine rounding: each weight within one quantization step of base + delta, while the
    # delta itself is several steps (so a fuse that dropped it would fail)
    step = np.repeat(np.abs(np.array(q.scales, dtype=np.float64)), 32, axis=1)
    assert (np.abs(got - target) <= step + 1e-6).all()
    assert np.abs(np.array(lo.delta())).max() > 3 * step.max()


def test_adapter_round_trip_swap_and_remove(tmp_path):
    model = tiny_llama()
    x = mx.array([[5, 6, 7, 8, 9, 10, 11]])
    base = np.array(model(x))
    keys = L.apply_lora(model, targets=["q_proj", "v_proj"], rank=4, alpha=8, num_layers=1)
    randomize_adapters(model, seed=7)
    adapted_a = np.array(model(x))
    cfg = L.adapter_config(model, keys, 1, 4, 8.0, 0.0)
    L.save_adapter(model, tmp_path / "a", cfg)
    randomize_adapters(model, seed=8)
    adapted_b = np.array(model(x))
    L.save_adapter(model, tmp_path / "b", cfg)

    saved = mx.load(str(tmp_path / "a" / L.ADAPTER_WEIGHTS))
    assert set(saved) == {
        f"model.layers.1.self_attn.{p}.{w}"
        for p in ("q_proj", "v_proj")
        for w in ("lora_a", "lora_b")
    }
    written = json.loads((tmp_path / "a" / L.ADAPTER_CONFIG).read_text())
    assert written["lora_parameters"] == {
        "rank": 4,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }

    fresh = tiny_llama()  # same seed: same base weights
    L.load_adapter(fresh, tmp_path / "a")
    np.testing.assert_array_equal(np.array(fresh(x)), adapted_a)
    L.load_adapter(fresh, tmp_path / "b")  # swap without reloading the base
    np.testing.assert_array_equal(np.array(fresh(x)), adapted_b)
    assert L.remove_adapter(fresh) == 2
    np.testing.assert_array_equal(np.array(fresh(x)), base)


def test_engine_load_with_adapter(tmp_path):
    import engine

    model = tiny_llama()
    folder = tmp_path / "base"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(TINY))
    keys = L.apply_lora(model, rank=4, alpha=4)
    randomize_adapters(model)
    L.save_adapter(model, tmp_path / "ad", L.adapter_config(model, keys, 2, 4, 4.0, 0.0))
    x = mx.array([[9, 8, 7, 6]])
    loaded = engine.load(folder, adapter=tmp_path / "ad", dtype="float32")
    np.testing.assert_allclose(np.array(loaded.model(x)), np.array(model(x)), atol=1e-5)


def test_bad_adapters_are_clear_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        L.load_adapter(model, tmp_path)
    keys = L.apply_lora(model, rank=4, alpha=8)
    L.save_adapter(model, tmp_path / "r4", L.adapter_config(model, keys, 2, 4, 8.0, 0.0))
    bigger = dict(TINY, hidden_size=96)
    other = tiny_llama(config=bigger)
    with pytest.raises(ModelLoadError, match="shape"):
        L.load_adapter(other, tmp_path / "r4")
    assert not L.lora_layers(other)  # nothing half-applied
    with pytest.raises(TrainingError, match="no linear layers"):
        L.apply_lora(tiny_llama(), targets=["nonexistent_proj"])


def test_mlx_lm_loads_our_adapter(tmp_path):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model = tiny_llama()
    folder = tmp_path / "base"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(TINY))
    keys = L.apply_lora(model, targets="all", rank=4, alpha=12, num_layers=1)
    randomize_adapters(model)
    L.save_adapter(model, tmp_path / "ad", L.adapter_config(model, keys, 1, 4, 12.0, 0.0))

    theirs, _ = load_model(folder)
    load_adapters(theirs, str(tmp_path / "ad"))
    x = mx.array([[4, 8, 15, 16, 23, 42]])
    np.testing.assert_allclose(np.array(theirs(x)), np.array(model(x)), atol=1e-4)


def test_mla_projections_adapted_and_absorbed_decode_sees_the_adapter():
    """DeepSeek-V2 latent attention: q_a/q_b/kv_a/kv_b projections take adapters; one-token decode
    (absorbed path, which reads kv_b_proj's weight instead of calling it) equals the full forward,
    and fusing gives the same logits."""
    from engine.models import get_model_classes

    Model, Args = get_model_classes("deepseek_v2")
    cfg = dict(
        model_type="deepseek_v2",
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=32,
        q_lora_rank=20,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
    )
    mx.random.seed(0)
    model = Model(Args.from_dict(cfg))
    mx.eval(model.parameters())
    keys = L.apply_lora(model, rank=4, alpha=8)
    for k in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert f"self_attn.{k}" in keys
    assert "mlp.shared_experts.down_proj" in keys and not any(k.endswith("gate") for k in keys)
    assert {
        "mlp.switch_mlp.gate_proj",
        "mlp.switch_mlp.up_proj",
        "mlp.switch_mlp.down_proj",
    } <= set(keys)
    randomize_adapters(model, seed=5)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = model(x)
    cache = model.make_cache()
    model(x[:, :-1], cache=cache)
    last = model(x[:, -1:], cache=cache)
    np.testing.assert_allclose(np.array(last[0, -1]), np.array(full[0, -1]), atol=1e-4)
    L.fuse(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(full), atol=1e-4)


def test_fp8_base_gradients_and_fuse():
    """QLoRA over the fp8 (e4m3, 128×128 block scales) linear of engine/quant: gradients equal
    torch on the dequantized weight; fusing re-quantizes to fp8 close to base + delta."""
    fp8 = pytest.importorskip("engine.quant.fp8")
    mx.random.seed(0)
    w = 0.05 * mx.random.normal((96, 160))
    base = fp8.Fp8Linear(160, 96, bias=False)
    base.weight, base.weight_scale_inv = fp8.quantize_fp8_blocks(w)
    layer = L.LoRALinear(base, rank=4, scale=2.0)
    assert L.linear_dims(base) == (160, 96)
    w64 = np.array(base.dequantized(mx.float32), dtype=np.float64)
    _check(layer, w64, None)
    target = w64 + np.array(layer.delta(), dtype=np.float64)
    fused = layer.fused()
    assert type(fused) is fp8.Fp8Linear
    got = np.array(fused.dequantized(mx.float32), dtype=np.float64)
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 of each block's scale-relative magnitude
    assert np.abs(got - target).max() <= 0.0625 * np.abs(target).max()


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_lora_gradients_match_torch(quantized):
    """Stacked experts: each token goes through its routed expert's base weight and its own A/B."""
    from engine.layers.moe import QuantizedSwitchLinear, SwitchLinear

    mx.random.seed(0)
    base = SwitchLinear(64, 40, num_experts=4)
    if quantized:
        base = QuantizedSwitchLinear.from_switch_linear(base, group_size=32, bits=4)
        w64 = np.stack(
            [
                unpack_affine(
                    np.array(base.weight[e]),
                    np.array(base.scales[e]),
                    np.array(base.biases[e]),
                    4,
                    32,
                )
                for e in range(4)
            ]
        )
    else:
        w64 = np.array(base.weight, dtype=np.float64)
    layer = L.LoRASwitchLinear(base, rank=4, scale=1.5)
    layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    x = mx.random.normal((10, 1, 64))
    idx = mx.array([0, 3, 1, 1, 2, 0, 3, 2, 2, 1])
    g = mx.random.normal((10, 1, 40))

    def loss(params, x):
        layer.update(params)
        return (layer(x, idx) * g).sum()

    params = layer.trainable_parameters()
    gx, gp = mx.grad(loss, argnums=1)(params, x), mx.grad(loss)(params, x)
    ix = np.array(idx)
    tx = torch.tensor(np.array(x, dtype=np.float64)[:, 0], requires_grad=True)
    ta = torch.tensor(np.array(layer.lora_a, dtype=np.float64), requires_grad=True)
    tb = torch.tensor(np.array(layer.lora_b, dtype=np.float64), requires_grad=True)
    tw = torch.tensor(w64)
    y = torch.einsum("ni,noi->no", tx, tw[ix]) + 1.5 * torch.einsum(
        "nr,nor->no", torch.einsum("ni,nri->nr", tx, ta[ix]), tb[ix]
    )
    (y * torch.tensor(np.array(g, dtype=np.float64)[:, 0])).sum().backward()
    np.testing.assert_allclose(np.array(gx)[:, 0], tx.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(gp["lora_a"]), ta.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(gp["lora_b"]), tb.grad.numpy(), atol=1e-5)

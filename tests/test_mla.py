"""Multi-head latent attention and its caches, checked against each other and against formulas.

Proves: the latent cache holds exactly kv_lora_rank + qk_rope_head_dim values per token per layer
(bytes in use = that x layers x tokens x itemsize; capacity grows in steps of 256 and `nbytes`
reports it); trim and state round-trip; the absorbed path and the materialised path agree to 1e-5
(whole sequences, a chunk after a cached prefix, single-token decode), and the absorbed decode
never applies `kv_b_proj` to build per-head keys/values; the quantized cache's absorbed path
(quantized matmuls) equals attention over its dequantized rows; the softmax scale follows the
YaRN mscale formula (DeepSeek-V2 paper / FACTS.md).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.layers.mla import (
    LatentCache,
    MultiHeadLatentAttention,
    QuantizedLatentCache,
    mla_softmax_scale,
)
from engine.models.deepseek_v2 import Model, ModelArgs

DIMS = dict(
    hidden_size=48,
    num_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=32,
    v_head_dim=12,
)


def _attn(q_lora_rank=None, seed=0) -> MultiHeadLatentAttention:
    mx.random.seed(seed)
    attn = MultiHeadLatentAttention(
        **DIMS, q_lora_rank=q_lora_rank, rope_config_dict={"rope_theta": 1000.0}
    )
    # non-trivial norm weights so the latent is not just unit-RMS noise
    attn.kv_a_layernorm.weight = 1 + 0.2 * mx.random.normal(attn.kv_a_layernorm.weight.shape)
    return attn


def _run(attn, x, mode, cache=None, mask="causal"):
    attn.mode = mode
    return attn(x, mask if x.shape[1] > 1 else None, cache)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_absorbed_equals_materialized(q_lora_rank):
    attn = _attn(q_lora_rank)
    x = mx.random.normal((2, 9, 48))
    full_m = _run(attn, x, "materialized")
    full_a = _run(attn, x, "absorbed")
    np.testing.assert_allclose(np.array(full_a), np.array(full_m), atol=1e-5, rtol=0)

    # a 5-token prefix, a 3-token chunk (cache offset 5), then one decode token, per path
    for mode in ("materialized", "absorbed"):
        cache = LatentCache(32, 32)
        parts = [
            _run(attn, x[:, :5], mode, cache),
            _run(attn, x[:, 5:8], mode, cache),
            _run(attn, x[:, 8:], mode, cache),
        ]
        np.testing.assert_allclose(
            np.array(mx.concatenate(parts, 1)), np.array(full_m), atol=1e-5, rtol=0
        )


class _Forbidden(nn.Linear):
    def __call__(self, x):
        raise AssertionError("kv_b_proj applied: per-head K/V built while decoding")


def test_decode_builds_no_per_head_kv():
    attn = _attn()
    x = mx.random.normal((1, 6, 48))
    cache = LatentCache(32, 32)
    ref = _run(attn, x, "materialized")
    _run(attn, x[:, :5], "auto", cache)  # prefill may materialise
    forbidden = _Forbidden(32, 4 * (16 + 12), bias=False)
    forbidden.weight = attn.kv_b_proj.weight
    attn.kv_b_proj = forbidden
    out = _run(attn, x[:, 5:], "auto", cache)  # one token: the absorbed path
    np.testing.assert_allclose(np.array(out), np.array(ref[:, 5:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_absorbed_equals_attention_over_dequantized_rows(bits):
    attn = _attn()
    x = mx.random.normal((2, 7, 48))
    qcache = QuantizedLatentCache(32, 32, bits=bits)
    _run(attn, x[:, :6], "materialized", qcache)
    got = _run(attn, x[:, 6:], "absorbed", qcache)  # quantized matmuls over the packed rows
    # the same held parts, dequantized, through the plain absorbed path
    c_kv, k_pe = qcache.dequantize((qcache.state[:3], qcache.state[3:]))

    class Replay(LatentCache):  # holds the dequantized history, appends the dequantized new row
        def update_and_fetch(self, _c, _k):
            return super().update_and_fetch(c_kv[..., 6:, :], k_pe[..., 6:, :])

    replay = Replay(32, 32)
    replay.state = (c_kv[..., :6, :], k_pe[..., :6, :])
    want = _run(attn, x[:, 6:], "absorbed", replay)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    assert qcache.bytes_per_token == 2 * (
        64 * bits // 8 + 2 * 2 * 4
    )  # 2 groups of 32, fp32 scale+bias


def test_latent_cache_holds_exactly_the_latent():
    args = ModelArgs.from_dict(
        dict(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            kv_lora_rank=24,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
        )
    )
    model = Model(args)
    cache = model.make_cache()
    tokens = mx.array([list(range(1, 41))])
    model(tokens[:, :30], cache)
    for i in range(30, 40):
        model(tokens[:, i : i + 1], cache)
    row = 24 + 8
    for c in cache:
        assert c.offset == 40
        c_kv, k_pe = c.state
        assert c_kv.shape == (1, 1, 40, 24) and k_pe.shape == (1, 1, 40, 8)
        assert c.bytes_per_token == row * 4
        assert c.nbytes == 256 * row * 4  # one 256-step block allocated
    in_use = sum(a.nbytes for c in cache for a in c.state)
    assert in_use == row * 3 * 40 * 4  # (r + rope) x layers x tokens x itemsize

    big = LatentCache(24, 8)
    big.update_and_fetch(mx.zeros((1, 1, 300, 24)), mx.zeros((1, 1, 300, 8)))
    assert big.nbytes == 512 * row * 4  # grown in steps of 256

    c = cache[0]
    before = [np.array(a) for a in c.state]
    assert c.trim(4) == 4 and c.offset == 36
    restored = LatentCache(1, 1)
    restored.state, restored.meta_state = c.state, c.meta_state
    assert restored.offset == 36 and restored.row == row
    for a, b in zip(restored.state, before):
        np.testing.assert_array_equal(np.array(a), b[..., :36, :])


def test_softmax_scale_yarn_formula():
    cfg = {
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
        },
        "rope_theta": 10000,
    }
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert mla_softmax_scale(192, cfg) == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert mla_softmax_scale(192, {"rope_theta": 10000}) == pytest.approx(192**-0.5)


@pytest.mark.parametrize("kind", ["affine4", "fp8"])
def test_paths_agree_with_quantized_kv_b_proj(kind):
    """With kv_b_proj quantized (MLX affine, or fp8 blocks as in DeepSeek-V3 checkpoints), the
    absorbed path (which dequantizes the weight) and the materialised path (which calls the layer)
    still agree."""
    attn = _attn()
    if kind == "affine4":
        attn.kv_b_proj = nn.QuantizedLinear.from_linear(attn.kv_b_proj, group_size=32, bits=4)
    else:
        from engine.quant.fp8 import Fp8Linear, quantize_fp8_blocks

        fp8 = Fp8Linear(32, 4 * (16 + 12), block=(16, 16))
        fp8.weight, fp8.weight_scale_inv = quantize_fp8_blocks(attn.kv_b_proj.weight, (16, 16))
        attn.kv_b_proj = fp8
    x = mx.random.normal((1, 6, 48))
    ref = _run(attn, x, "materialized")
    cache = LatentCache(32, 32)
    _run(attn, x[:, :5], "materialized", cache)
    out = _run(attn, x[:, 5:], "absorbed", cache)
    np.testing.assert_allclose(np.array(out), np.array(ref[:, 5:]), atol=1e-5, rtol=0)

"""The CPU kernels for affine-quantized weights (kernels/cpu/qmatmul.cpp) against independent
references: numpy float64 on weights unpacked bit by bit from MLX's packed words, bit-exact
float32 dequantization, MLX's own `quantized_matmul`, and greedy decoding of the real model
with and without the kernels.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from latent_kernels import cpu  # noqa: E402

K = cpu.load()
# Only a machine without a C++ compiler may lack them; where one exists, a failed build fails.
COMPILER = (
    sys.platform.startswith("linux")
    and shutil.which("g++") is not None
    and not os.environ.get(cpu.DISABLE_ENV)
)
pytestmark = pytest.mark.skipif(
    K is None and not COMPILER, reason=f"CPU kernels not built: {cpu.load_error()}"
)


def test_kernels_build_where_a_compiler_exists():
    assert K is not None, cpu.load_error()


def unpack_np(w: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine packing, read independently: element j of a uint32 word is bits [bits*j, ...)."""
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    q = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # (N, words, per)
    return q.reshape(w.shape[0], -1)


def dequant_np(w, scales, biases, group: int, bits: int, dtype=np.float64) -> np.ndarray:
    q = unpack_np(np.array(w), bits).astype(dtype)
    s = np.repeat(np.array(scales.astype(mx.float32)).astype(dtype), group, axis=1)
    b = np.repeat(np.array(biases.astype(mx.float32)).astype(dtype), group, axis=1)
    return q * s + b


def quantized(n: int, k: int, group: int, bits: int, scale_dtype=mx.float32, seed: int = 0):
    mx.random.seed(seed)
    w, s, b = mx.quantize(mx.random.normal((n, k)), group, bits)
    return w, s.astype(scale_dtype), b.astype(scale_dtype)


def qmm_error_bound(x, ref_w) -> np.ndarray:
    """The most `qmm_rows` may differ from float64 x @ W^T: on AVX2 machines the activations are
    rounded to int16 per 32-element block (step max|x|/32767, so half a step per element, times
    |w|), plus float32 rounding of the sums."""
    x = np.array(x).astype(np.float64).reshape(-1, ref_w.shape[1])
    k = x.shape[1]
    kp = -(-k // 32) * 32
    blocks = np.abs(np.pad(x, ((0, 0), (0, kp - k)))).reshape(len(x), -1, 32).max(-1)
    step = np.repeat(blocks / 32767, 32, axis=1)[:, :k]
    return 0.5 * step @ np.abs(ref_w).T + 1e-5 * np.abs(x) @ np.abs(ref_w).T + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_qmm_rows_matches_float64_reference(bits, group, scale_dtype):
    k = 800 if group == 32 else 768  # 800 = 12.5 x 64: a last lone 32-element block
    w, s, b = quantized(640, k, group, bits, getattr(mx, scale_dtype))
    ref_w = dequant_np(w, s, b, group, bits)
    for rows in (1, 2, 3, 4, 5, 7, 9):
        x = mx.random.normal((rows, k))
        x = x * (1 + 20 * (mx.arange(k) % 97 == 0))  # outliers, as real hidden states have
        got = np.array(K.qmm_rows(x, w, s, b, group, bits))
        want = np.array(x).astype(np.float64) @ ref_w.T
        assert (np.abs(got - want) <= qmm_error_bound(x, ref_w)).all()


def test_qmm_rows_keeps_leading_dims_and_equals_mlx_op():
    w, s, b = quantized(576, 576, 32, 4)
    x = mx.random.normal((2, 3, 576))
    got = K.qmm_rows(x, w, s, b, 32, 4)
    assert got.shape == (2, 3, 576) and got.dtype == mx.float32
    want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)
    bound = qmm_error_bound(x, dequant_np(w, s, b, 32, 4)).reshape(got.shape)
    assert (np.abs(np.array(got) - np.array(want)) <= bound).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_dequantize_is_bit_exact(bits, scale_dtype):
    w, s, b = quantized(300, 256, 64, bits, getattr(mx, scale_dtype))
    got = np.array(K.dequantize_f32(w, s, b, 64, bits))
    # q * s + b in float32, rounded after each operation (no fused multiply-add)
    want = dequant_np(w, s, b, 64, bits, dtype=np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_thread_count_does_not_change_results():
    w, s, b = quantized(4096, 512, 64, 4)
    x = mx.random.normal((3, 512))
    before = K.num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            K.set_num_threads(n)
            assert K.num_threads() == n
            outs.append(np.array(K.qmm_rows(x, w, s, b, 64, 4)))
            outs.append(np.array(K.dequantize_f32(w, s, b, 64, 4)))
    finally:
        K.set_num_threads(before)
    for a, c in zip(outs[0::2], outs[2::2]):
        np.testing.assert_array_equal(a, c)
    for a, c in zip(outs[1::2], outs[3::2]):
        np.testing.assert_array_equal(a, c)


def test_gradient_through_qmm_rows():
    w, s, b = quantized(256, 128, 32, 8)
    wf = mx.dequantize(w, s, b, 32, 8)
    x = mx.random.normal((2, 128))
    g_ours = mx.grad(lambda x: (K.qmm_rows(x, w, s, b, 32, 8) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: ((x @ wf.T) ** 2).sum())(x)
    # the same math up to the forward's int16 activations (qmm_error_bound), ~1e-4 relative
    ref = np.array(g_ref)
    np.testing.assert_allclose(np.array(g_ours), ref, rtol=0, atol=1e-3 * np.abs(ref).max())


def test_bad_inputs_are_refused_clearly():
    w, s, b = quantized(64, 128, 32, 4)
    with pytest.raises(ValueError, match="4- and 8-bit"):
        K.qmm_rows(mx.zeros((1, 128)), w, s, b, 32, 3)
    with pytest.raises(ValueError, match="last dimension"):
        K.qmm_rows(mx.zeros((1, 64)), w, s, b, 32, 4)
    with pytest.raises(ValueError, match="float32"):
        K.qmm_rows(mx.zeros((1, 128), dtype=mx.float16), w, s, b, 32, 4)
    with pytest.raises(ValueError, match="scales/biases"):
        K.qmm_rows(mx.zeros((1, 128)), w, s[:, :2], b, 32, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.dequantize_f32(w, s, b, 16, 4)


def _tiny_quantized_llama(bits: int):
    import mlx.nn as nn

    from engine.models import get_model_classes

    Model, Args = get_model_classes("llama")
    args = Args.from_dict(
        dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
             max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)
    )  # fmt: skip
    mx.random.seed(3)
    model = Model(args)
    nn.quantize(model, group_size=32, bits=bits)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_model_layers_switch_and_match_mlx_ops(bits):
    from engine.quant.cpu import CpuQuantizedEmbedding, CpuQuantizedLinear, restore, use_cpu_kernels

    model = _tiny_quantized_llama(bits)
    ids = mx.array([[(i * 13) % 320 for i in range(20)]])
    ref_one, ref_many = model(ids[:, :1]), model(ids)
    n = use_cpu_kernels(model, force=True)
    assert n == 2 * 7 + 1  # every projection of both layers, and the tied embedding
    assert use_cpu_kernels(model, force=True) == 0  # nothing left to switch: idempotent
    assert type(model.model.embed_tokens) is CpuQuantizedEmbedding
    assert type(model.layers[0].mlp.down_proj) is CpuQuantizedLinear
    # MLX's ops compute in float32 throughout; ours round activations to int16 (~1e-5 relative)
    np.testing.assert_allclose(np.array(model(ids[:, :1])), np.array(ref_one), atol=1e-3)
    np.testing.assert_allclose(np.array(model(ids)), np.array(ref_many), atol=1e-3)
    assert restore(model) == n
    assert type(model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"


@pytest.mark.slow
def test_real_model_greedy_tokens_unchanged_by_kernels(default_model_path, monkeypatch):
    """SmolLM2 Q4_1/Q8_0: 32 greedy tokens with our kernels equal those of MLX's own ops."""
    import engine
    from engine import generate
    from engine.generate import generate_step
    from engine.quant.cpu import restore, use_cpu_kernels

    # the layers' classes are set by hand below, not by the generation loop
    monkeypatch.setattr(generate, "use_blas_prefill", lambda model, force=False: 0)
    lm = engine.load(default_model_path)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]

    def greedy(ids):
        out = []
        for tok, _ in generate_step(lm.model, ids, lm.model.make_cache(), max_tokens=32):
            out.append(tok)
        return out

    for p in prompts:
        ids = lm.tokenizer.encode(p)
        assert use_cpu_kernels(lm.model) > 0
        ours = greedy(ids)
        restore(lm.model)
        theirs = greedy(ids)
        assert ours == theirs, p


def test_strided_activations_and_weights():
    """Transposed/sliced inputs (not row-contiguous) give the same result as contiguous ones."""
    w, s, b = quantized(128, 256, 64, 4)
    xt = mx.random.normal((256, 3)).T  # (3, 256), column-major
    want = np.array(K.qmm_rows(mx.array(np.array(xt)), w, s, b, 64, 4))
    np.testing.assert_array_equal(np.array(K.qmm_rows(xt, w, s, b, 64, 4)), want)
    wide = mx.concatenate([w, w], axis=1)[:, : w.shape[1]]  # a strided view of the same words
    np.testing.assert_array_equal(np.array(K.dequantize_f32(wide, s, b, 64, 4)),
                                  np.array(K.dequantize_f32(w, s, b, 64, 4)))  # fmt: skip


def attention_np(q, k, v, scale: float, causal: bool) -> np.ndarray:
    """float64 softmax(q k^T scale + causal mask aligned to the end of the keys) v, GQA."""
    q, k, v = (np.array(t).astype(np.float64) for t in (q, k, v))
    _, hq, L, _ = q.shape
    S = k.shape[2]
    k = np.repeat(k, hq // k.shape[1], axis=1)
    v = np.repeat(v, hq // v.shape[1], axis=1)
    s = q @ k.transpose(0, 1, 3, 2) * scale
    if causal:
        s = np.where(np.arange(S)[None] <= np.arange(L)[:, None] + S - L, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize(
    "B,Hq,Hkv,L,S,D,Dv,causal",
    [
        (1, 9, 3, 130, 130, 64, 64, True),  # prompt chunk, GQA
        (2, 4, 2, 5, 37, 64, 64, True),  # a chunk after 32 cached tokens, batch of 2
        (1, 9, 3, 1, 300, 64, 64, False),  # one decoded token
        (1, 2, 1, 17, 17, 24, 16, True),  # head dims not multiples of 8 / Dv != D
        (1, 2, 2, 10, 10, 12, 12, True),  # portable path (Dv % 8 != 0)
        (1, 3, 1, 1, 1, 8, 8, True),  # a single key
    ],
)
def test_attention_matches_float64_reference(B, Hq, Hkv, L, S, D, Dv, causal):
    q = mx.random.normal((B, Hq, L, D))
    k = mx.random.normal((B, Hkv, S, D))
    v = mx.random.normal((B, Hkv, S, Dv))
    got = np.array(K.attention(q, k, v, 0.3, causal))
    np.testing.assert_allclose(got, attention_np(q, k, v, 0.3, causal), atol=2e-5, rtol=0)


@pytest.mark.parametrize("L,S", [(1, 300), (1, 5), (17, 40)])
def test_attention_reads_float16_keys_and_values(L, S):
    """A float16 KV cache: the kernel reads K/V as stored and computes in float32."""
    q = mx.random.normal((1, 9, L, 64))
    k = mx.random.normal((1, 3, S, 64)).astype(mx.float16)
    v = mx.random.normal((1, 3, S, 64)).astype(mx.float16)
    got = np.array(K.attention(q, k, v, 0.125, True))
    want = attention_np(q, k.astype(mx.float32), v.astype(mx.float32), 0.125, True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="one dtype"):
        K.attention(q, k, v.astype(mx.float32), 0.125, True)


def test_attention_reads_a_kv_cache_view_and_has_mlx_gradients():
    buf = mx.random.normal((1, 3, 768, 64))  # a cache buffer longer than what it holds
    k, v = buf[:, :, :500, :], buf[:, :, :500, :] * 2
    q = mx.random.normal((1, 9, 20, 64))
    np.testing.assert_allclose(
        np.array(K.attention(q, k, v, 0.125, True)), attention_np(q, k, v, 0.125, True), atol=2e-5
    )
    g_ours = mx.grad(lambda q: K.attention(q, k, v, 0.125, True).sum())(q)
    g_mlx = mx.grad(
        lambda q: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal").sum()
    )(q)
    np.testing.assert_allclose(np.array(g_ours), np.array(g_mlx), atol=1e-5)


def test_swiglu_matches_float64_reference_and_has_gradients():
    g = mx.random.normal((3, 1000)) * 8
    u = mx.random.normal((3, 1000))
    gn, un = np.array(g).astype(np.float64), np.array(u).astype(np.float64)
    want = gn / (1 + np.exp(-gn)) * un
    np.testing.assert_allclose(np.array(K.swiglu(g, u)), want, rtol=1e-6, atol=1e-30 + 1e-7)
    tails = mx.array([-100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0])
    np.testing.assert_allclose(
        np.array(K.swiglu(tails, mx.ones_like(tails))),
        np.array(tails) / (1 + np.exp(-np.array(tails).astype(np.float64))),
        rtol=1e-6, atol=1e-30,
    )  # fmt: skip
    grads = mx.grad(lambda g, u: K.swiglu(g, u).sum(), argnums=(0, 1))(g, u)
    want_g = mx.grad(lambda g, u: (g * mx.sigmoid(g) * u).sum(), argnums=(0, 1))(g, u)
    for a, b in zip(grads, want_g):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)


def test_rms_norm_matches_float64_reference():
    x = mx.random.normal((2, 3, 576)) * 3
    w = mx.random.normal((576,))
    xn, wn = np.array(x).astype(np.float64), np.array(w).astype(np.float64)
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * wn
    np.testing.assert_allclose(np.array(K.rms_norm(x, w, 1e-5)), want, rtol=1e-5, atol=1e-5)


def rope_np(x, dims, traditional, periods, scale, offsets):
    """float64 rotary embedding; offsets: one start position per batch row."""
    x = np.array(x).astype(np.float64)
    out = x.copy()
    half = dims // 2
    L = x.shape[2]
    for b, off in enumerate(offsets):
        theta = ((off + np.arange(L))[:, None] * scale) / np.array(periods)[None, :]  # (L, half)
        c, s = np.cos(theta), np.sin(theta)
        i1 = np.arange(half) * 2 if traditional else np.arange(half)
        i2 = i1 + 1 if traditional else i1 + half
        x1, x2 = x[b][..., i1], x[b][..., i2]
        out[b][..., i1] = x1 * c - x2 * s
        out[b][..., i2] = x1 * s + x2 * c
    return out


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
def test_rope_matches_float64_reference_and_mlx(traditional, dims):
    from engine.layers.rope import default_periods

    periods = default_periods(dims, 10000.0)
    x = mx.random.normal((2, 5, 9, 64)).transpose(0, 2, 1, 3)  # (B, H, L, D), strided view
    got = K.rope(x, dims, traditional, periods, 0.5, 40)
    want = rope_np(x, dims, traditional, periods, 0.5, [40, 40])
    np.testing.assert_allclose(np.array(got), want, atol=2e-5)
    mlx = mx.fast.rope(x, dims, traditional=traditional, base=None, scale=0.5, offset=40,
                       freqs=periods)  # fmt: skip
    np.testing.assert_allclose(np.array(got), np.array(mlx), atol=2e-6)
    rows = mx.array([3, 17], dtype=mx.int32)  # batch rows at their own positions
    got_rows = K.rope(x, dims, traditional, periods, 0.5, 0, rows)
    np.testing.assert_allclose(
        np.array(got_rows), rope_np(x, dims, traditional, periods, 0.5, [3, 17]), atol=2e-5
    )
    g = mx.grad(lambda x: (K.rope(x, dims, traditional, periods, 0.5, 40) ** 2).sum())(x)
    g_mlx = mx.grad(lambda x: (mx.fast.rope(x, dims, traditional=traditional, base=None,
                                            scale=0.5, offset=40, freqs=periods) ** 2).sum())(x)  # fmt: skip
    np.testing.assert_allclose(np.array(g), np.array(g_mlx), atol=1e-5)


def test_log_softmax_matches_float64_reference():
    x = mx.random.normal((2, 49152)) * 6
    xn = np.array(x).astype(np.float64)
    m = xn.max(-1, keepdims=True)
    want = xn - m - np.log(np.exp(xn - m).sum(-1, keepdims=True))
    got = np.array(K.log_softmax(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert abs(np.exp(got.astype(np.float64)).sum(-1) - 1).max() < 1e-5


def test_log_softmax_and_rms_norm_gradients_equal_mlx():
    x = mx.random.normal((2, 300)) * 3
    w = mx.random.normal((300,))
    g = mx.grad(lambda x: (K.log_softmax(x) * w).sum())(x)
    g_mlx = mx.grad(lambda x: ((x - mx.logsumexp(x, axis=-1, keepdims=True)) * w).sum())(x)
    np.testing.assert_allclose(np.array(g), np.array(g_mlx), atol=1e-5)
    gn = mx.grad(lambda x, w: (K.rms_norm(x, w, 1e-5) ** 2).sum(), argnums=(0, 1))(x, w)
    gn_mlx = mx.grad(lambda x, w: (mx.fast.rms_norm(x, w, 1e-5) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(gn, gn_mlx):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


def test_thread_pool_runs_every_chunk_exactly_once_under_churn():
    """Thousands of pool runs whose chunk counts alternate (as a decode step's do): every
    result equals the first computation of the same product. (A worker holding the previous
    run's state once could claim a chunk of the next run before it began.)"""
    shapes = [(64, 128), (1536, 576), (192, 576), (576, 1536), (33, 64)]
    cases = []
    for i, (n, k) in enumerate(shapes):
        w, s, b = quantized(n, k, 32, 4, seed=i)
        x = mx.random.normal((1, k))
        cases.append((x, w, s, b, np.array(K.qmm_rows(x, w, s, b, 32, 4))))
    for _ in range(120):
        outs = [K.qmm_rows(x, w, s, b, 32, 4) for x, w, s, b, _ in cases]
        mx.eval(outs)
        for out, case in zip(outs, cases):
            np.testing.assert_array_equal(np.array(out), case[4])

"""The fused one-token decode path (kernels/cpu/decode.h, engine/layers/fused.py): one layer
against a numpy float64 reference, whole models against the op-by-op path (llama, qwen2's
q/k/v biases, qwen3's q/k norms, dense and 4/8-bit weights, across a cache growth boundary),
the cache written in place only when nothing else holds it, and the cases it must decline.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from test_cpu_kernels import K, attention_np, dequant_np, pytestmark, quantized, rope_np  # noqa: E402,F401

import engine.layers.fused as fused  # noqa: E402


def _rms(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _linear(n, k, bits, group, bias, seed):
    """(kernel parts, float64 weight, float64 bias) of one random linear layer."""
    rng = np.random.default_rng(seed)
    b = mx.array(rng.normal(size=n).astype(np.float32)) if bias else None
    if bits:
        w, s, bb = quantized(n, k, group, bits, seed=seed)
        return [w, s, bb, b], dequant_np(w, s, bb, group, bits), b
    w = mx.array((rng.normal(size=(n, k)) / np.sqrt(k)).astype(np.float32))
    return [w, None, None, b], np.array(w).astype(np.float64), b


@pytest.mark.parametrize(
    "Hq,Hkv,bits,group,bias,qk_norm,traditional,rope_dims,mscale,kv_dtype",
    [
        (4, 4, 0, 0, False, False, False, 32, 1.0, "float32"),  # dense float32, MHA
        (9, 3, 4, 32, False, False, False, 32, 1.0, "float32"),  # SmolLM2's GQA shape, Q4 g32
        (9, 3, 4, 32, False, False, False, 32, 1.0, "float16"),  # ... on a float16 cache
        (12, 1, 8, 64, True, False, True, 32, 1.0, "float32"),  # 12 query heads, one K/V head
        (12, 1, 8, 64, True, False, True, 32, 1.0, "float16"),  # (2 blocks: the >4-rows path)
        (4, 2, 4, 64, True, True, False, 16, 1.3, "float32"),  # qwen3 q/k norm, partial, yarn
    ],
)
def test_one_layer_matches_float64_reference(
    Hq, Hkv, bits, group, bias, qk_norm, traditional, rope_dims, mscale, kv_dtype
):
    D, Dh, I, S, eps = 128, 32, 256, 37, 1e-5  # S keys already cached; the new token is at S
    rng = np.random.default_rng(0)
    lin = {
        name: _linear(n, k, bits, group, bias if name in "qkv" else False, seed)
        for seed, (name, n, k) in enumerate(
            [("q", Hq * Dh, D), ("k", Hkv * Dh, D), ("v", Hkv * Dh, D), ("o", D, Hq * Dh),
             ("gate", I, D), ("up", I, D), ("down", D, I)]
        )
    }  # fmt: skip
    norm1, norm2, qn, kn = (
        mx.array(rng.uniform(0.5, 1.5, n).astype(np.float32)) for n in (D, D, Dh, Dh)
    )
    periods = mx.array(10000.0 ** (np.arange(0, rope_dims, 2) / rope_dims), dtype=mx.float32)
    h = mx.array(rng.normal(size=(1, 1, D)).astype(np.float32))
    cap = 64
    store = getattr(mx, kv_dtype)
    keys = mx.array(rng.normal(size=(1, Hkv, cap, Dh)).astype(np.float32)).astype(store)
    values = mx.array(rng.normal(size=(1, Hkv, cap, Dh)).astype(np.float32)).astype(store)
    k_before, v_before = np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32))
    pos = mx.array(S, dtype=mx.int32)

    def parts(*names):
        return [p for n in names for p in lin[n][0]]

    qkv = K.decode_qkv(
        h, pos, norm1, parts("q", "k", "v"), [bits] * 3, [group] * 3,
        qn if qk_norm else None, kn if qk_norm else None, periods, Hq, Hkv, Dh, eps, rope_dims,
        traditional, 1.0, mscale,
    )  # fmt: skip
    new_keys = K.kv_write(keys, qkv, pos, Hq * Dh)
    new_values = K.kv_write(values, qkv, pos, (Hq + Hkv) * Dh)
    out = K.decode_rest(
        h, qkv, new_keys, new_values, pos, parts("o", "gate", "up", "down"), [bits] * 4,
        [group] * 4, norm2, Hq, eps, Dh**-0.5,
    )  # fmt: skip

    # float64 reference, written from the definitions
    def proj(name, x):
        _, w, b = lin[name]
        y = x @ w.T
        return y + np.array(b) if b is not None else y

    h64 = np.array(h).astype(np.float64).reshape(D)
    x = _rms(h64, np.array(norm1), eps)
    q = proj("q", x).reshape(Hq, Dh)
    k = proj("k", x).reshape(Hkv, Dh)
    v = proj("v", x).reshape(Hkv, Dh)
    if qk_norm:
        q, k = _rms(q, np.array(qn), eps), _rms(k, np.array(kn), eps)
    q = rope_np(q[None, :, None] * mscale, rope_dims, traditional, np.array(periods), 1.0, [S])
    k = rope_np(k[None, :, None] * mscale, rope_dims, traditional, np.array(periods), 1.0, [S])
    # quantized projections round activations to int16 (test_cpu_kernels.qmm_error_bound)
    tol = 2e-3 * np.abs(q).max()
    np.testing.assert_allclose(np.array(qkv)[: Hq * Dh], q.reshape(-1), atol=tol)
    if kv_dtype == "float16":  # the cache holds the new position rounded, and attention reads that
        k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    k_all = np.concatenate([k_before[:, :, :S], k], axis=2)
    v_all = np.concatenate([v_before[:, :, :S], v[None, :, None]], axis=2)
    att = attention_np(q, k_all, v_all, Dh**-0.5, False).reshape(Hq * Dh)
    a = h64 + proj("o", att)
    x2 = _rms(a, np.array(norm2), eps)
    g, u = proj("gate", x2), proj("up", x2)
    want = a + proj("down", g / (1 + np.exp(-g)) * u)
    np.testing.assert_allclose(np.array(out).reshape(D), want, atol=2e-3 * np.abs(want).max())
    # the cache: position S written, every other position as before
    assert new_keys.dtype == store and new_values.dtype == store
    got_k, got_v = np.array(new_keys.astype(mx.float32)), np.array(new_values.astype(mx.float32))
    np.testing.assert_allclose(got_k[:, :, S], k[:, :, 0], atol=2e-3 * np.abs(k).max())
    np.testing.assert_allclose(got_v[0, :, S], v, atol=2e-3 * np.abs(v).max())
    others = np.arange(cap) != S
    np.testing.assert_array_equal(got_k[:, :, others], k_before[:, :, others])
    np.testing.assert_array_equal(got_v[:, :, others], v_before[:, :, others])


def _model(model_type: str, bits: int, **extra):
    import mlx.nn as nn

    from engine.models import get_model_classes

    Model, Args = get_model_classes(model_type)
    cfg = dict(model_type=model_type, hidden_size=192, num_hidden_layers=2, intermediate_size=256,
               num_attention_heads=6, num_key_value_heads=2, vocab_size=320,
               max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=bits != 0)  # fmt: skip
    cfg.update(extra)
    mx.random.seed(5)
    model = Model(Args.from_dict(cfg))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def _decode(model, prompt: list[int], steps: int, enabled: bool, monkeypatch) -> np.ndarray:
    from engine.generate import generate_step

    monkeypatch.setattr(fused, "ENABLED", enabled)
    rows = []
    for _, logprobs in generate_step(model, prompt, model.make_cache(), max_tokens=steps):
        rows.append(np.array(logprobs))
    return np.stack(rows)


@pytest.mark.parametrize(
    "model_type,bits,extra",
    [
        ("llama", 4, {}),
        ("llama", 8, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", 0, {"rope_traditional": True}),
        ("qwen2", 4, {}),  # q/k/v biases
        ("qwen3", 0, {"head_dim": 32}),  # per-head q/k RMSNorm
    ],
)  # fmt: skip
def test_models_decode_the_same_fused_and_op_by_op(model_type, bits, extra, monkeypatch):
    model = _model(model_type, bits, **extra)
    calls = []
    real = fused.fused_decode

    def counted(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("engine.models.llama.fused_decode", counted)
    prompt = [(i * 37) % 320 for i in range(250)]  # decoding crosses the 256-position growth
    want = _decode(model, prompt, 12, False, monkeypatch)
    calls.clear()
    got = _decode(model, prompt, 12, True, monkeypatch)
    assert calls and all(calls)  # every decode step took the fused path
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_cache_written_in_place_unless_someone_else_holds_it():
    buf = mx.zeros((1, 2, 8, 4))
    qkv = mx.arange(24, dtype=mx.float32)
    mx.eval(buf, qkv)
    before = K.kv_write_copies()
    out = K.kv_write(buf, qkv, mx.array(3, dtype=mx.int32), 8)
    held = buf  # a second reference (like a forked conversation's snapshot)
    mx.eval(out)
    assert K.kv_write_copies() == before + 1  # copied: the held buffer must stay as it was
    assert float(mx.abs(held).max()) == 0.0
    np.testing.assert_array_equal(np.array(out)[0, :, 3], np.arange(8, 16).reshape(2, 4))
    del held, buf
    before = K.kv_write_copies()
    out = K.kv_write(out, qkv, mx.array(4, dtype=mx.int32), 0)  # only the write holds it now
    mx.eval(out)
    assert K.kv_write_copies() == before
    np.testing.assert_array_equal(np.array(out)[0, :, 4], np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(np.array(out)[0, :, 3], np.arange(8, 16).reshape(2, 4))


def test_generation_writes_the_cache_in_place(monkeypatch):
    model = _model("llama", 4)
    before = K.kv_write_copies()
    _decode(model, list(range(40)), 30, True, monkeypatch)
    # the first write of each buffer may copy (the prompt's cache); the other steps must not
    assert K.kv_write_copies() - before <= 2 * 2 * 2


def test_a_forked_prefix_is_left_untouched(monkeypatch):
    from engine.session import _fork

    model = _model("llama", 4)
    monkeypatch.setattr(fused, "ENABLED", True)
    cache = model.make_cache()
    model(mx.array([list(range(20))]), cache=cache)
    snapshot = [np.array(c.state[0]) for c in cache]
    fork = _fork(model, cache)
    for c in cache:
        c.trim(5)  # the original conversation goes back 5 tokens and continues differently
    for t in (7, 8, 9, 10, 11, 12):
        mx.eval(model(mx.array([[t]]), cache=cache))
    for c, snap in zip(fork, snapshot):
        np.testing.assert_array_equal(np.array(c.state[0]), snap)


def test_declines_what_it_does_not_cover(monkeypatch):
    from engine.train.lora import apply_lora

    monkeypatch.setattr(fused, "ENABLED", True)
    h = mx.zeros((1, 1, 192))
    model = _model("llama", 4)
    prefill = mx.array([list(range(8))])

    def fresh(kv_bits=None):
        cache = model.make_cache(kv_bits)
        model(prefill, cache=cache)
        return cache

    assert fused.fused_decode(model.layers, h, fresh()) is not None
    assert fused.fused_decode(model.layers, h, fresh(kv_bits=8)) is None  # quantized KV cache
    assert fused.fused_decode(model.layers, mx.zeros((2, 1, 192)), fresh()) is None  # batch of 2
    assert fused.fused_decode(model.layers, h, None) is None
    cache = fresh()
    offsets = [c.offset for c in cache]
    apply_lora(model, rank=4, num_layers=1)  # a LoRA-wrapped projection
    assert fused.fused_decode(model.layers, h, cache) is None
    assert [c.offset for c in cache] == offsets  # nothing touched


def test_bad_arguments_are_refused_clearly():
    w, s, b = quantized(64, 128, 32, 4)
    norm = mx.ones((128,))
    periods = mx.ones((16,))
    h = mx.zeros((1, 1, 128))
    pos = mx.array(0, dtype=mx.int32)
    good = [w, s, b, None]
    args = dict(norm=norm, q_norm=None, k_norm=None, periods=periods, n_heads=2, n_kv_heads=2,
                head_dim=32, eps=1e-5, rope_dims=32, traditional=False, rope_scale=1.0, mscale=1.0)  # fmt: skip
    K.decode_qkv(h, pos, linears=good * 3, bits=[4] * 3, groups=[32] * 3, **args)
    with pytest.raises(ValueError, match="k: weight shape"):
        wk, sk, bk = quantized(96, 128, 32, 4)
        K.decode_qkv(h, pos, linears=good + [wk, sk, bk, None] + good, bits=[4] * 3,
                     groups=[32] * 3, **args)  # fmt: skip
    with pytest.raises(ValueError, match="v: quantized weights need scales"):
        K.decode_qkv(h, pos, linears=good * 2 + [w, None, None, None], bits=[4] * 3,
                     groups=[32] * 3, **args)  # fmt: skip
    with pytest.raises(ValueError, match="pos must be one int32"):
        K.decode_qkv(h, mx.array(0.0), linears=good * 3, bits=[4] * 3, groups=[32] * 3, **args)
    with pytest.raises(ValueError, match="scales must be float32"):
        K.qmm_rows(mx.zeros((1, 128)), w, s.astype(mx.int32), b.astype(mx.int32), 32, 4)
    with pytest.raises(ValueError, match="kv_write"):
        K.kv_write(mx.zeros((2, 2, 8, 4)), mx.zeros((24,)), pos, 0)


def test_compiled_step_equals_uncompiled_and_traces_once_per_capacity(monkeypatch):
    model = _model("llama", 4)
    prompt = [(i * 11) % 320 for i in range(200)]
    monkeypatch.setattr(fused, "COMPILE", False)
    want = _decode(model, prompt, 80, True, monkeypatch)  # positions 200..279: one growth at 256
    assert "_fused_step" not in model.layers[0].__dict__
    monkeypatch.setattr(fused, "COMPILE", True)
    got = _decode(model, prompt, 80, True, monkeypatch)
    np.testing.assert_array_equal(got, want)
    _, _, traced = model.layers[0].__dict__["_fused_step"]
    assert traced.traces == 2  # once for the 256-position buffers, once after they grew to 512
    # new weights (a fused adapter, a reload) get a new compiled step, not the stale one
    held = model.layers[0].__dict__["_fused_step"]
    layer = model.layers[1].mlp.down_proj
    layer.scales = layer.scales * 2
    _decode(model, prompt[:10], 3, True, monkeypatch)
    assert model.layers[0].__dict__["_fused_step"] is not held


def test_float16_kv_cache_halves_the_bytes_and_decodes_alike(monkeypatch):
    from engine.cache import KVCache

    model = _model("llama", 4)
    monkeypatch.setattr(fused, "ENABLED", True)
    half, full = model.make_cache(16), model.make_cache()
    assert all(type(c) is KVCache and c.dtype == mx.float16 for c in half)
    prompt = mx.array([list(range(40))])
    for cache in (half, full):
        model(prompt, cache=cache)
    assert half[0].keys.dtype == mx.float16 and full[0].keys.dtype == mx.float32
    assert 2 * half[0].bytes_per_token == full[0].bytes_per_token
    for t in (3, 9, 27):  # fused decode steps on each: K/V rounded to float16, math in float32
        a, b = model(mx.array([[t]]), cache=half), model(mx.array([[t]]), cache=full)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-2)
    assert half[0].keys.dtype == mx.float16 and half[0].offset == 43


def test_load_takes_kv_bits_16(default_model_path):
    import engine
    from engine.errors import ModelLoadError

    lm = engine.load(default_model_path, kv_bits=16)
    assert lm.model.make_cache()[0].dtype == mx.float16
    with pytest.raises(ModelLoadError, match="expected 4, 8 or 16"):
        engine.load(default_model_path, kv_bits=12)

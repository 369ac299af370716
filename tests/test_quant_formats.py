"""Weight formats decode to the values their definitions give, checked against independent
references: a float64 numpy table of all 256 e4m3 codes built from sign/exponent/mantissa, torch's
float8_e4m3fn, numpy block-scale expansion on ragged shapes, MLX affine round-trip error bounds,
and gguf-py's own dequantizers for Q4_0/Q4_1/Q8_0 as MLX loads them. Also: bad layouts raise
QuantError naming the tensor, and our safetensors writer round-trips F8_E4M3 through torch.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from latent_kernels.affine_dequant import affine_dequant_ref, dequant_affine
from latent_kernels.fp8_dequant import e4m3_decode_ref, fp8_dequant_ref

from engine.errors import QuantError
from engine.quant import Fp8Linear, prepare_model, quantize_fp8_blocks, save_safetensors
from engine.quant.affine import quantize_affine
from engine.quant.fp8 import E4M3_TABLE, dequant_fp8_cpu
from engine.quant.safetensors_fp8 import fp8_header_check, safetensors_dtypes


def e4m3_table_f64() -> np.ndarray:
    """All 256 codes from the OCP e4m3fn definition, in float64."""
    out = np.empty(256, np.float64)
    for code in range(256):
        s, e, m = code >> 7, (code >> 3) & 15, code & 7
        if e == 15 and m == 7:
            v = np.nan
        elif e == 0:
            v = 2.0**-6 * (m / 8)
        else:
            v = 2.0 ** (e - 7) * (1 + m / 8)
        out[code] = -v if s else v
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaN where NaN, and -0 distinguished from +0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nan = np.isnan(a)
    return bool(
        np.array_equal(nan, np.isnan(b))
        and np.array_equal(a[~nan], b[~nan])
        and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan]))
    )


def test_all_256_e4m3_codes_match_definition_and_torch():
    import torch

    table = e4m3_table_f64()
    codes = mx.arange(256, dtype=mx.uint32).astype(mx.uint8)
    ours = np.array(e4m3_decode_ref(codes))
    assert _same(ours, table)
    assert _same(np.array(E4M3_TABLE), table)
    # the CPU fast path leans on MLX's own decoder: it must agree on every code too
    assert _same(np.array(mx.from_fp8(codes, dtype=mx.float32, stream=mx.cpu)), table)
    t = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    assert _same(ours, t)
    # the landmarks the format is known by
    assert table[0x7E] == 448.0 and np.isnan(table[0x7F]) and np.isnan(table[0xFF])
    assert table[0x01] == 2.0**-9 and table[0x08] == 2.0**-6 and np.signbit(table[0x80])


@pytest.mark.parametrize("shape", [(300, 200), (129, 257), (5, 7), (256, 128)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_block_scales_ragged_shapes(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    n, k = shape
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    sshape = (-(-n // 128), -(-k // 128))
    scales = rng.uniform(1e-4, 2.0, size=sshape).astype(np.float32)
    expanded = scales[np.arange(n)[:, None] // 128, np.arange(k)[None, :] // 128]
    # fp8 (4 significant bits) x fp32 (24) is exact in float64: one rounding to float32
    want = (e4m3_table_f64()[codes] * expanded).astype(np.float32)
    want = want.astype(np.float16) if dtype == mx.float16 else want
    got = fp8_dequant_ref(mx.array(codes), mx.array(scales), (128, 128), dtype)
    assert _same(np.array(got), want)
    fast = dequant_fp8_cpu(mx.array(codes), mx.array(scales), (128, 128), dtype)
    assert _same(np.array(fast), want)


def test_fp8_block_quantize_round_trip_and_torch_codes():
    import torch

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((200, 300)) * rng.uniform(0.01, 10, size=(200, 1))).astype(np.float32)
    codes, scales = quantize_fp8_blocks(mx.array(w))
    assert codes.dtype == mx.uint8 and scales.shape == (2, 3) and scales.dtype == mx.float32
    s = np.array(scales)
    expanded = s[np.arange(200)[:, None] // 128, np.arange(300)[None, :] // 128]
    deq = e4m3_table_f64()[np.array(codes)] * expanded
    # round to nearest with 3 mantissa bits: relative error <= 2^-4, or one subnormal half-step
    bound = np.maximum(np.abs(w) * 2.0**-4, expanded * 2.0**-10) * (1 + 1e-6)
    assert np.all(np.abs(deq - w) <= bound)
    # each block's max lands on +-448 exactly
    assert np.nanmax(np.abs(e4m3_table_f64()[np.array(codes)])) == 448.0
    t = torch.from_numpy((w / expanded.astype(np.float32)).astype(np.float32))
    tcodes = t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(np.array(codes), tcodes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_round_trip_within_half_scale(bits, group_size):
    rng = np.random.default_rng(bits * group_size)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    for sdt, eps in ((mx.float32, 1e-6), (mx.float16, 2e-3)):
        wq, scales, biases = quantize_affine(mx.array(w), group_size, bits, scale_dtype=sdt)
        deq = np.array(affine_dequant_ref(wq, scales, biases, group_size, bits, mx.float32))
        s = np.repeat(np.array(scales, np.float32), group_size, axis=1)
        assert np.all(np.abs(w - deq) <= s / 2 + eps)
        # MLX's quantized matmul reads our packing: same product as dequantize-then-matmul
        x = mx.array(rng.standard_normal((2, 256)).astype(np.float32))
        qm = mx.quantized_matmul(
            x, wq, scales.astype(mx.float32), biases.astype(mx.float32), True, group_size, bits
        )
        np.testing.assert_allclose(np.array(qm), np.array(x) @ deq.T, rtol=1e-4, atol=1e-3)
    # mx.quantize snaps its grid so zero is exact: same layout, a looser bound (one scale)
    wq, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    deq = np.array(affine_dequant_ref(wq, scales, biases, group_size, bits, mx.float32))
    s = np.repeat(np.abs(np.array(scales)), group_size, axis=1)
    assert np.all(np.abs(w - deq) <= s + 1e-6)
    # independent unpacking in numpy: low bits first within each uint32
    words = np.array(wq)
    q = (words[..., None] >> (np.arange(32 // bits) * bits).astype(np.uint32)) & ((1 << bits) - 1)
    q = q.reshape(16, 256).astype(np.float64)
    ref = q * np.repeat(np.array(scales), group_size, 1) + np.repeat(
        np.array(biases), group_size, 1
    )
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-6)
    assert np.array_equal(
        np.array(dequant_affine(wq, scales, biases, group_size, bits, mx.float32)), deq
    )


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_as_mlx_loads_them(tmp_path, qtype):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    w = np.random.default_rng(7).standard_normal((8, 128)).astype(np.float32)
    path = tmp_path / "w.gguf"
    writer = GGUFWriter(str(path), "llama")
    q = quantize(w, t)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    d = mx.load(str(path))
    bits = 8 if qtype == "Q8_0" else 4
    wq, scales, biases = (
        d["blk.0.attn_q.weight"],
        d["blk.0.attn_q.scales"],
        d["blk.0.attn_q.biases"],
    )
    ours = affine_dequant_ref(wq, scales, biases, 32, bits, mx.float32)
    ref = dequantize(q, t).reshape(8, 128)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-3, atol=1e-3)


def test_fp8_linear_matches_numpy():
    rng = np.random.default_rng(2)
    lin = Fp8Linear(200, 130, bias=True)
    codes, scales = quantize_fp8_blocks(
        mx.array(rng.standard_normal((130, 200)).astype(np.float32))
    )
    bias = rng.standard_normal(130).astype(np.float32)
    lin.load_weights([("weight", codes), ("weight_scale_inv", scales), ("bias", mx.array(bias))])
    x = rng.standard_normal((3, 200)).astype(np.float32)
    s = np.array(scales)
    wd = (
        e4m3_table_f64()[np.array(codes)]
        * s[np.arange(130)[:, None] // 128, np.arange(200)[None] // 128]
    )
    want = x.astype(np.float64) @ wd.T + bias
    np.testing.assert_allclose(np.array(lin(mx.array(x))), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(lin(mx.array(x[0]))), want[0], rtol=1e-4, atol=1e-4)
    assert lin.weight.dtype == mx.uint8 and lin.weight.nbytes == 130 * 200


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(200, 130, bias=False)
        self.b = nn.Linear(64, 64, bias=False)


def _fp8_weights():
    codes, scales = quantize_fp8_blocks(mx.random.normal((130, 200)))
    return {"a.weight": codes, "a.weight_scale_inv": scales, "b.weight": mx.zeros((64, 64))}


def test_prepare_model_swaps_only_scaled_linears():
    m = _Two()
    prepare_model(m, _fp8_weights(), {})
    assert isinstance(m.a, Fp8Linear) and type(m.b) is nn.Linear


def test_bad_layouts_name_the_tensor():
    w = _fp8_weights()
    w["a.weight_scale_inv"] = mx.ones((2, 1))
    with pytest.raises(QuantError, match=r"a\.weight_scale_inv.*\(2, 1\).*expected \(2, 2\)"):
        prepare_model(_Two(), w, {})
    w = _fp8_weights()
    del w["a.weight_scale_inv"]
    with pytest.raises(QuantError, match=r"a\.weight: .*without a\.weight_scale_inv"):
        prepare_model(_Two(), w, {})
    w = _fp8_weights()
    w["a.weight"] = w["a.weight"].astype(mx.bfloat16)
    with pytest.raises(QuantError, match=r"a\.weight: expected fp8"):
        prepare_model(_Two(), w, {})
    # 7 bits per weight: 200 inputs * 7 = 1400 bits = 43.75 words, so not a whole width
    m = _Two()
    bad = {
        "b.weight": mx.zeros((64, 14), mx.uint32),
        "b.scales": mx.ones((64, 1)),
        "b.biases": mx.ones((64, 1)),
    }
    with pytest.raises(QuantError, match=r"b: unsupported affine layout \(bits=7"):
        prepare_model(m, bad, {})


def test_safetensors_f8_e4m3_round_trip(tmp_path):
    import torch
    from safetensors.torch import load_file

    codes, scales = quantize_fp8_blocks(mx.random.normal((130, 200)))
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": codes, "s": scales, "b": mx.ones(3, mx.bfloat16)}, fp8_keys={"w"})
    assert safetensors_dtypes(path) == {"w": "F8_E4M3", "s": "F32", "b": "BF16"}
    assert fp8_header_check(path) == ["w"]
    t = load_file(str(path))
    assert t["w"].dtype == torch.float8_e4m3fn
    assert np.array_equal(t["w"].view(torch.uint8).numpy(), np.array(codes))
    back = mx.load(str(path))
    assert back["w"].dtype == mx.uint8 and mx.array_equal(back["w"], codes)
    assert mx.array_equal(back["b"], mx.ones(3, mx.bfloat16))
    e5 = tmp_path / "e5.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4).to(torch.float8_e5m2)}, str(e5))
    with pytest.raises(QuantError, match="tensor x is F8_E5M2"):
        fp8_header_check(e5)

"""fp8 e4m3 weights with 2-D block scales (DeepSeek-V3 `weight` + `weight_scale_inv`), kept at
one byte per parameter at runtime.

`quantize_fp8_blocks` turns a float matrix into codes + scales; `Fp8Linear` is the layer that
holds them and computes by dequantizing to the activation dtype (the kernels on a GPU; on the
CPU MLX's from_fp8 + a block multiply, bit-identical to `kernels.fp8_dequant.fp8_dequant_ref`).
It does not know which layers a checkpoint quantizes: `engine.quant.prepare_model` decides.

CPU policy (measured, see BENCHMARKS.md): dequantize per call. Caching the fp32 copy at load is
faster per token but costs 4 bytes/param on top of the 1 byte kept, which is what fp8 is for;
`Fp8Linear.cache_dequantized = True` (or LATENT_FP8_CACHE=1) opts into it.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from latent_kernels._common import pick
from latent_kernels.fp8_dequant import dequant_fp8, e4m3_decode_ref
from latent_kernels.fp8_matvec import matvec_fp8

from engine.device import compute_dtype

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)

# The 256 e4m3 values as float32, from the bit-level decoder (the spec).
E4M3_TABLE = e4m3_decode_ref(mx.arange(256, dtype=mx.uint32).astype(mx.uint8))


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """(ceil(N/BN), ceil(K/BK)): one scale per block, ragged last blocks included."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def quantize_fp8_blocks(
    w: mx.array, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[mx.array, mx.array]:
    """float (N, K) → (uint8 e4m3 codes (N, K), float32 scale_inv (ceil(N/BN), ceil(K/BK))).

    Each block's scale is amax/448, so its largest value maps onto the largest finite code;
    w ≈ e4m3(code) · scale_inv (round to nearest even, saturating).
    """
    n, k = w.shape
    bn, bk = block
    nb, kb = scale_shape((n, k), block)
    wf = w.astype(mx.float32)
    padded = mx.pad(wf, [(0, nb * bn - n), (0, kb * bk - k)])
    amax = mx.abs(padded.reshape(nb, bn, kb, bk)).max(axis=(1, 3))  # (nb, kb)
    scale = mx.maximum(amax, 1e-12) / E4M3_MAX
    full = mx.repeat(mx.repeat(scale, bn, axis=0), bk, axis=1)[:n, :k]
    codes = mx.to_fp8(mx.clip(wf / full, -E4M3_MAX, E4M3_MAX))
    return codes, scale.astype(mx.float32)


def dequant_fp8_cpu(
    w: mx.array, scale_inv: mx.array, block: tuple[int, int], dtype: mx.Dtype
) -> mx.array:
    """The CPU path: decode, then one float32 multiply per element by its block scale.

    Same roundings as `fp8_dequant_ref` (tested bit for bit), fewer ops: no bit arithmetic and
    no (N, K) scale tensor when the shape divides into blocks. Leading axes (stacked experts,
    `w` (E, N, K) with `scale_inv` (E, nb, kb)) are carried along.
    """
    *lead, n, k = w.shape
    bn, bk = block
    nb, kb = scale_inv.shape[-2:]
    # MLX's CPU from_fp8 decodes all 256 codes like the spec (tested; its Metal twin reads the
    # NaN code as 480, hence our own kernels on GPUs) and runs ~4x faster than a table gather
    v = mx.from_fp8(w, dtype=mx.float32)  # (..., N, K)
    s = scale_inv.astype(mx.float32)[..., :, None, :, None]  # (..., nb, 1, kb, 1)
    if n != nb * bn or k != kb * bk:
        v = mx.pad(v, [(0, 0)] * len(lead) + [(0, nb * bn - n), (0, kb * bk - k)])
    v = (v.reshape(*lead, nb, bn, kb, bk) * s).reshape(*lead, nb * bn, kb * bk)
    if n != nb * bn or k != kb * bk:
        v = v[..., :n, :k]
    return v.astype(dtype)


def dequant_fp8_any(
    w: mx.array, scale_inv: mx.array, block: tuple[int, int], dtype: mx.Dtype
) -> mx.array:
    """2-D or stacked fp8 weights to floats: the kernel on a GPU, `dequant_fp8_cpu` on the CPU."""
    if pick(None) is None:
        return dequant_fp8_cpu(w, scale_inv, block, dtype)
    if w.ndim == 2:
        return dequant_fp8(w, scale_inv, block, dtype)
    *lead, n, k = w.shape
    if n % block[0] == 0:  # blocks never straddle two experts: one flat kernel launch
        flat = dequant_fp8(
            w.reshape(-1, k), scale_inv.reshape(-1, scale_inv.shape[-1]), block, dtype
        )
        return flat.reshape(*lead, n, k)
    return dequant_fp8_cpu(w, scale_inv, block, dtype)


def _cache_default() -> bool:
    return os.environ.get("LATENT_FP8_CACHE", "") not in ("", "0")


class Fp8Linear(nn.Module):
    """A linear layer whose weight stays fp8 e4m3 (uint8) with float32 block scales.

    Parameters are named like the checkpoint: `weight` (out, in) uint8, `weight_scale_inv`
    (ceil(out/BN), ceil(in/BK)) float32, optional `bias`.
    """

    cache_dequantized: bool | None = None  # None: LATENT_FP8_CACHE decides

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = False,
        block: tuple[int, int] = DEFAULT_BLOCK,
    ):
        super().__init__()
        self.block = (int(block[0]), int(block[1]))
        self.weight = mx.zeros((output_dims, input_dims), dtype=mx.uint8)
        self.weight_scale_inv = mx.ones(scale_shape((output_dims, input_dims), self.block))
        if bias:
            self.bias = mx.zeros((output_dims,))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantized(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The weight as a float matrix (kernel on a GPU, from_fp8 + block multiply on the CPU)."""
        return dequant_fp8_any(
            self.weight, self.weight_scale_inv, self.block, dtype or compute_dtype()
        )

    def _use_cache(self) -> bool:
        return _cache_default() if self.cache_dequantized is None else self.cache_dequantized

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype if x.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32
        out_dims, in_dims = self.weight.shape
        if self._use_cache():
            # underscore keys stay out of parameters(): the cache is neither saved nor counted
            if "_dequant_cache" not in self or self["_dequant_cache"].dtype != dtype:
                self["_dequant_cache"] = self.dequantized(dtype)
            y = x @ self["_dequant_cache"].T
        elif x.size == in_dims and pick(None) is not None:
            # one-token decode on a GPU: fused kernel, the weight is never widened
            y = matvec_fp8(self.weight, self.weight_scale_inv, x, self.block, dtype)
            y = y.reshape(*x.shape[:-1], out_dims)
        else:
            y = x @ self.dequantized(dtype).T
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y


class Fp8SwitchLinear(nn.Module):
    """Stacked experts (engine.layers.moe.SwitchLinear) kept as fp8 codes + block scales.

    `weight` (E, out, in) uint8, `weight_scale_inv` (E, ceil(out/BN), ceil(in/BK)) float32.
    Decode (few token-expert pairs) widens only the experts picked; longer inputs widen all.
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        block: tuple[int, int] = DEFAULT_BLOCK,
    ):
        super().__init__()
        self.block = (int(block[0]), int(block[1]))
        self.weight = mx.zeros((num_experts, output_dims, input_dims), dtype=mx.uint8)
        nb, kb = scale_shape((output_dims, input_dims), self.block)
        self.weight_scale_inv = mx.ones((num_experts, nb, kb))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x (..., 1, in), indices (...) -> (..., 1, out) with expert indices[...] applied."""
        dtype = x.dtype if x.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32
        if 2 * indices.size < self.num_experts:
            flat = indices.reshape(-1)
            w = dequant_fp8_any(self.weight[flat], self.weight_scale_inv[flat], self.block, dtype)
            rhs = mx.arange(flat.size, dtype=mx.uint32).reshape(indices.shape)
            y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=rhs, sorted_indices=sorted_indices)
        else:
            w = dequant_fp8_any(self.weight, self.weight_scale_inv, self.block, dtype)
            y = mx.gather_mm(
                x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
            )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2).astype(y.dtype)
        return y

"""MLX affine quantization (w = scale·q + bias per group along the last axis), our own quantizer.

`quantize_affine` uses each group's min and max (scale = (max-min)/(2^bits-1), bias = min), so
every weight is within scale/2 of its dequantized value. `mx.quantize` instead snaps the grid so
that zero is exact, which can cost up to a whole scale at a group's far edge; the packed layout is
the same, so `nn.QuantizedLinear` and `kernels.affine_dequant` read both.
GGUF Q4_0/Q4_1/Q8_0 arrive from `mx.load` already in this layout (group 32).
"""

from __future__ import annotations

import mlx.core as mx

from engine.errors import QuantError

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


def quantize_affine(
    w: mx.array, group_size: int = 64, bits: int = 4, scale_dtype: mx.Dtype | None = None
) -> tuple[mx.array, mx.array, mx.array]:
    """float (N, K) → (uint32 packed (N, K·bits/32), scales (N, K/g), biases (N, K/g)).

    q = round((w - min)/scale) in [0, 2^bits - 1], packed lowest bits first in uint32 words.
    Scales and biases keep `scale_dtype` (default: w's dtype).
    """
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"bits={bits}: supported widths are {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUPS:
        raise QuantError(f"group_size={group_size}: supported group sizes are {SUPPORTED_GROUPS}")
    n, k = w.shape
    if k % group_size:
        raise QuantError(f"input width {k} is not a multiple of group_size={group_size}")
    sdt = scale_dtype or w.dtype
    levels = (1 << bits) - 1
    g = w.astype(mx.float32).reshape(n, k // group_size, group_size)  # (N, G, g)
    lo = g.min(axis=-1, keepdims=True).astype(sdt).astype(mx.float32)
    hi = g.max(axis=-1, keepdims=True)
    # widen a little before rounding the scale to a narrow dtype, so the grid still reaches max
    widen = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}.get(sdt, 0.0)
    scale = mx.maximum((hi - lo) / levels * (1 + widen), 1e-8).astype(sdt).astype(mx.float32)
    q = mx.clip(mx.round((g - lo) / scale), 0, levels).astype(mx.uint32)
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    packed = (q.reshape(n, k // per_word, per_word) << shifts).sum(axis=-1).astype(mx.uint32)
    return packed, scale.squeeze(-1).astype(sdt), lo.squeeze(-1).astype(sdt)


def bytes_per_param(bits: int, group_size: int, scale_bytes: int = 2) -> float:
    """Storage of one affine weight: its bits plus a scale and a bias per group."""
    return bits / 8 + 2 * scale_bytes / group_size

"""Scaled dot-product attention and its masks (causal with a cache offset, padding, window).

`scaled_dot_product_attention` wraps `mx.fast.scaled_dot_product_attention`, which handles
grouped-query attention (fewer K/V heads than Q heads) itself. Masks are either the string
"causal" (MLX aligns it to the end of the keys, so it is right with a cache offset), None, or a
boolean array broadcastable to (B, H, L, S) where True means "may attend".

This module does not know how K/V are stored (see engine/cache.py) or how positions are encoded.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from engine.quant.cpu import cpu_kernels_for


def create_causal_mask(
    n: int, offset: int = 0, window_size: int | None = None, lengths: mx.array | None = None
) -> mx.array:
    """(n, offset+n) boolean mask: query i (at position offset+i) sees keys j <= offset+i.

    `window_size` limits each query to its last `window_size` keys (sliding window).
    `lengths` (B,) gives each row's valid key count; the result is then (B, 1, n, offset+n).
    """
    rinds = mx.arange(offset + n)
    linds = mx.arange(offset, offset + n)[:, None]
    mask = linds >= rinds[None]
    if window_size is not None:
        mask = mask & (linds < rinds[None] + window_size)
    if lengths is not None:
        mask = mask[None, None] & (rinds[None, None, None, :] < lengths[:, None, None, None])
    return mask


def padding_mask(attention_mask: mx.array, n: int, offset: int = 0) -> mx.array:
    """Causal mask combined with a (B, S) 0/1 key mask (left or right padding): (B, 1, n, S)."""
    s = attention_mask.shape[-1]
    causal = create_causal_mask(n, s - n)
    if offset + n != s:
        raise ValueError(f"attention_mask covers {s} keys, cache offset {offset} + {n} new tokens")
    return causal[None, None] & attention_mask.astype(mx.bool_)[:, None, None, :]


def create_attention_mask(h: mx.array, cache: Any = None, window_size: int | None = None):
    """The mask for hidden states h (B, L, ·) given the layer's cache: "causal", None or an array."""
    n = h.shape[1]
    offset = cache.offset if cache is not None else 0
    if window_size is not None and offset + n > window_size:
        return create_causal_mask(n, offset, window_size=window_size)
    if n == 1:
        return None  # one new token sees every cached key
    return "causal"


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = None
) -> mx.array:
    """softmax(q·kᵀ·scale + mask)·v for q (B, Hq, L, D), k/v (B, Hkv, S, D) -> (B, Hq, L, Dv).

    On the CPU, float32 attention with no mask or the causal one runs in our kernel (one
    threaded SIMD op; MLX's CPU path composes matmul, mask, softmax and matmul and spent ~45%
    of a prompt chunk here); array masks (padding, windows) keep MLX's op.
    """
    if (mask is None or (isinstance(mask, str) and mask == "causal")) and q.ndim == 4:
        kern = cpu_kernels_for(q)
        if kern is not None and k.dtype == v.dtype and k.dtype in (mx.float32, mx.float16):
            # K/V may come from a float16 cache (engine/cache.py): read as they are
            return kern.attention(q, k, v, scale, mask == "causal")
    if k.dtype != q.dtype:  # a float16 cache under float32 compute, on MLX's own op
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_ and mask.dtype != q.dtype:
        mask = mask.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

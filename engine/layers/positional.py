"""Absolute and bias-style position encodings: sinusoidal, learned, ALiBi, none.

RoPE lives in layers/rope.py (it rotates q and k inside attention); these either add a vector
to the token embeddings (sinusoidal, learned) or add a bias to the attention scores (ALiBi).
Each takes the cache `offset` so that cached decoding sees the same positions as a full pass.
This module knows nothing about a particular model's weights.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def sinusoidal_table(positions: mx.array, dims: int, base: float = 10000.0) -> mx.array:
    """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(same). (L, dims)."""
    half = mx.arange(0, dims, 2, dtype=mx.float32)
    angles = positions.astype(mx.float32)[:, None] / (base ** (half / dims))[None]  # (L, d/2)
    pe = mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1)  # (L, d/2, 2): interleaved
    return pe.reshape(positions.shape[0], -1)[:, :dims]


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal encodings added to the embeddings (no parameters)."""

    def __init__(self, dims: int, base: float = 10000.0):
        super().__init__()
        self.dims, self.base = dims, base

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        pos = mx.arange(offset, offset + x.shape[1])
        return x + sinusoidal_table(pos, self.dims, self.base).astype(x.dtype)[None]


class LearnedPositions(nn.Module):
    """A trained table of `max_positions` vectors (gpt2's `wpe`), added to the embeddings."""

    def __init__(self, max_positions: int, dims: int):
        super().__init__()
        self.weight = mx.random.normal((max_positions, dims)) * 0.02
        self.max_positions = max_positions

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        end = offset + x.shape[1]
        if end > self.max_positions:
            raise ValueError(f"position {end - 1} beyond the learned table ({self.max_positions})")
        return x + self.weight[offset:end].astype(x.dtype)[None]


class NoPositions(nn.Module):
    """No position signal at all (a causal mask alone still orders tokens, weakly)."""

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return x


def alibi_slopes(n_heads: int) -> mx.array:
    """Press et al.: geometric slopes 2^(-8/n)…; for non-powers of two, the nearest lower
    power's slopes then every other slope of the doubled set."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return mx.array(slopes, dtype=mx.float32)


def alibi_mask(n_heads: int, n: int, offset: int = 0, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive (1, H, n, offset+n) scores bias: -slope·(query pos − key pos), −inf above the diagonal."""
    q = mx.arange(offset, offset + n)[:, None]
    k = mx.arange(offset + n)[None]
    dist = (q - k).astype(mx.float32)  # (n, S)
    bias = -alibi_slopes(n_heads)[:, None, None] * dist[None]  # (H, n, S)
    bias = mx.where(dist[None] < 0, -mx.inf, bias)
    return bias[None].astype(dtype)

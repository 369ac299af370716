"""Rotary position embeddings (RoPE) and their context-extension variants.

Variants, read from a Hugging Face config (`rope_scaling` in older configs, `rope_parameters` in
transformers 5, which also holds `rope_theta`): default, linear, llama3, dynamic (NTK), YaRN.
Two layouts: half-split (`traditional=False`, HF llama's `rotate_half`) and interleaved pairs
(`traditional=True`, the original paper / GGML). Rotation runs through `mx.fast.rope` (our CPU
kernel on the CPU, engine/quant/cpu.py); variants
only differ in the per-pair frequencies, a position scale, and (YaRN) a magnitude factor.

This module does not know about attention or caches: callers pass the position `offset`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.quant.cpu import cpu_kernels_for

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


def rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """One flat dict of RoPE settings from either config style (theta included, type normalised)."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict):
            params.update({k: v for k, v in value.items() if v is not None})
    theta = params.get("rope_theta", config.get("rope_theta"))
    params["rope_theta"] = float(theta) if theta is not None else 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "su":  # old alias
        rope_type = "longrope"
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        params.setdefault(
            "original_max_position_embeddings",
            config.get("original_max_position_embeddings") or config.get("max_position_embeddings"),
        )
    return params


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(
    params: dict[str, Any], max_position_embeddings: int | None = None
) -> float:
    """The factor YaRN multiplies cos/sin by (so q·k scores by its square), as HF computes it."""
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / params["original_max_position_embeddings"]
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def default_inv_freq(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def llama3_inv_freq(dims: int, base: float, params: dict[str, Any]) -> mx.array:
    """Llama 3.1: low frequencies divided by `factor`, high kept, a smooth blend in between."""
    inv = default_inv_freq(dims, base)
    factor = float(params["factor"])
    low, high = (
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
    )
    old_ctx = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = mx.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return mx.where(medium, smoothed, scaled)


def yarn_inv_freq(dims: int, base: float, params: dict[str, Any], max_pos: int | None) -> mx.array:
    """YaRN: interpolate slow pairs by `factor`, extrapolate fast ones, linear ramp between."""
    factor = params.get("factor")
    orig = float(params["original_max_position_embeddings"])
    if factor is None:
        factor = max_pos / orig
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dims - 1)
    if lo == hi:
        hi += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - lo) / (hi - lo), 0, 1)
    extrap = default_inv_freq(dims, base)
    interp = extrap / factor
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return interp * (1 - keep) + extrap * keep


@functools.lru_cache(maxsize=64)
def default_periods(dims: int, base: float) -> mx.array:
    """Per-pair periods base^(2i/dims) of the default RoPE (what mx.fast.rope derives from base)."""
    return mx.array(base ** (np.arange(0, dims, 2, dtype=np.float64) / dims), dtype=mx.float32)


class RoPE(nn.Module):
    """Applies RoPE to (B, H, L, D) tensors at positions offset..offset+L-1.

    `dims` may be smaller than D (partial rotary); the rest passes through unchanged.
    """

    def __init__(
        self,
        dims: int,
        params: dict[str, Any] | None = None,
        traditional: bool = False,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        params = dict(params or {"rope_type": "default", "rope_theta": 10000.0})
        self.dims = dims
        self.traditional = traditional
        self.rope_type = params.get("rope_type", "default")
        self.base = float(params.get("rope_theta", 10000.0))
        self.max_pos = max_position_embeddings
        self.scale = 1.0  # position multiplier
        self.mscale = 1.0  # magnitude multiplier on the rotated output
        self.factor = float(params.get("factor") or 1.0)
        inv: mx.array | None = None
        if self.rope_type == "linear":
            self.scale = 1.0 / self.factor
        elif self.rope_type == "llama3":
            inv = llama3_inv_freq(dims, self.base, params)
        elif self.rope_type == "yarn":
            inv = yarn_inv_freq(dims, self.base, params, max_position_embeddings)
            self.mscale = yarn_attention_factor(params, max_position_embeddings)
        elif self.rope_type not in ("default", "dynamic"):
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if params.get("freq_factors") is not None:
            # GGUF `rope_freqs.weight`: llama.cpp divides each pair's frequency by its factor
            # (how llama 3.x scaling travels in GGUF files)
            factors = mx.array(params["freq_factors"], dtype=mx.float32)
            inv = (default_inv_freq(dims, self.base) if inv is None else inv) / factors
        # mx.fast.rope takes per-pair periods (1/inv_freq); stored privately, not a parameter.
        self._periods = None if inv is None else 1.0 / inv

    def _dynamic_base(self, seq_len: int) -> float:
        # NTK-aware: grow the base once the sequence passes the trained length (HF "dynamic").
        if self.max_pos is None or seq_len <= self.max_pos:
            return self.base
        f = self.factor
        return self.base * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dims / (self.dims - 2))

    def periods_at(self, offset: int, n: int) -> mx.array:
        """Per-pair periods for positions offset..offset+n-1 (what our CPU kernels take)."""
        if self._periods is not None:
            return self._periods
        base = self.base
        if self.rope_type == "dynamic":
            base = self._dynamic_base(int(offset) + n)
        return default_periods(self.dims, base)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.mscale != 1.0:
            # rotation is linear, so scaling the input equals HF's scaling of cos and sin
            x = x * self.mscale
        # an int offset, or one per batch row (int32, (B,)); "dynamic" needs an int
        per_row = isinstance(offset, mx.array) and offset.ndim == 1 and offset.dtype == mx.int32
        usable = isinstance(offset, int) or (per_row and self.rope_type != "dynamic")
        kern = cpu_kernels_for(x) if usable and x.ndim == 4 else None
        if kern is not None:
            # one primitive instead of MLX's composed CPU graph (~60 us a call here)
            periods = self.periods_at(0 if per_row else offset, x.shape[-2])
            if per_row:
                return kern.rope(x, self.dims, self.traditional, periods, self.scale, 0, offset)
            return kern.rope(x, self.dims, self.traditional, periods, self.scale, offset)
        if self._periods is not None:
            return mx.fast.rope(
                x,
                self.dims,
                traditional=self.traditional,
                base=None,
                scale=self.scale,
                offset=offset,
                freqs=self._periods,
            )
        base = self.base
        if self.rope_type == "dynamic":
            base = self._dynamic_base(int(offset) + x.shape[-2])
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=base, scale=self.scale, offset=offset
        )


def make_rope(
    head_dim: int, config: dict[str, Any], traditional: bool = False, dims: int | None = None
) -> RoPE:
    """RoPE for one attention layer from a HF-style config dict."""
    params = rope_config(config)
    if dims is None:
        dims = int(
            head_dim
            * float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
        )
    return RoPE(dims, params, traditional, config.get("max_position_embeddings"))

"""Multi-head latent attention (DeepSeek-V2 §2.1) and the latent-only caches it decodes from.

Per token, a layer caches only the normalised latent c_kv (kv_lora_rank values, after
`kv_a_layernorm`) and the rotated shared key k_pe (qk_rope_head_dim values): kv_lora_rank +
qk_rope_head_dim values in all. Two ways to attend over them, same result:

- absorbed (decoding): the key up-projection W_UK is folded into the query
  (q_lat = q_nope·W_UK), so scores are q_lat·c_kv + q_pe·k_pe against the cached rows
  directly, the attention output stays in latent space, and W_UV is applied after it. No
  per-head key or value is ever built.
- materialised (prefill): per-head k_nope and v are built from c_kv through `kv_b_proj` for
  the attention of this call only, then dropped; with many queries this is cheaper.

`LatentCache` keeps the rows in full precision; `QuantizedLatentCache` keeps them MLX-affine
quantized (8 or 4 bits, groups of 64 or 32 along each part) and the absorbed path reads them
through `mx.quantized_matmul` without dequantizing the whole cache.

This module does not know MoE, the decoder layer, or how a checkpoint names its config keys:
`engine/models/deepseek_v2.py` passes the dimensions in.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.layers.attention import create_causal_mask, scaled_dot_product_attention
from engine.layers.norm import RMSNorm
from engine.layers.rope import make_rope, rope_config, yarn_get_mscale

# ----------------------------------------------------------------------------------- caches


class LatentCache:
    """One MLA layer's cache: c_kv (B, 1, S, kv_lora_rank) and k_pe (B, 1, S, rope_dim).

    The two parts live in separate buffers so each is contiguous for the matmuls reading it.
    Capacity grows in steps of `step` positions; `nbytes` is what is allocated,
    `bytes_per_token` what one more position costs.
    """

    step = 256

    def __init__(self, kv_lora_rank: int, rope_dim: int) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.buffers: list[mx.array] | None = None  # each (B, 1, capacity, ·)
        self.offset = 0

    @property
    def row(self) -> int:
        """Values held per token (per batch row): kv_lora_rank + rope_dim."""
        return self.kv_lora_rank + self.rope_dim

    def _append(self, new: list[mx.array]) -> list[mx.array]:
        """Write L new positions into each buffer (growing them if needed); return views [:S]."""
        b, _, n, _ = new[0].shape
        end = self.offset + n
        bufs = self.buffers
        if (
            bufs is None
            or end > bufs[0].shape[2]
            or bufs[0].shape[0] != b
            or any(x.dtype != y.dtype for x, y in zip(bufs, new))
        ):
            size = -(-end // self.step) * self.step
            grown = [mx.zeros((b, 1, size, x.shape[-1]), x.dtype) for x in new]
            if bufs is not None and self.offset > 0 and bufs[0].shape[0] == b:
                for g, old in zip(grown, bufs):
                    g[..., : self.offset, :] = old[..., : self.offset, :]
            self.buffers = bufs = grown
        for buf, x in zip(bufs, new):
            buf[..., self.offset : end, :] = x
        self.offset = end
        return [buf[..., :end, :] for buf in bufs]

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Append c_kv (B, 1, L, r) and k_pe (B, 1, L, rope); return all held (B, 1, S, ·)."""
        c, k = self._append([c_kv, k_pe])
        return c, k

    @property
    def nbytes(self) -> int:
        return 0 if self.buffers is None else sum(b.nbytes for b in self.buffers)

    @property
    def bytes_per_token(self) -> int:
        if self.buffers is None:
            return 0
        return sum(b.shape[0] * b.shape[-1] * b.dtype.size for b in self.buffers)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.buffers is None or self.offset == 0

    @property
    def state(self) -> tuple:
        return () if self.buffers is None else tuple(b[..., : self.offset, :] for b in self.buffers)

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.buffers, self.offset = None, 0
            return
        self.buffers = list(value)
        self.offset = self.buffers[0].shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), str(self.kv_lora_rank), str(self.rope_dim))

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            self.offset, self.kv_lora_rank, self.rope_dim = (int(v) for v in value[:3])


def group_size_for(dims: int) -> int:
    """The largest MLX group size (64, then 32) dividing `dims`."""
    for g in (64, 32):
        if dims % g == 0:
            return g
    raise ValueError(f"quantized latent cache: dimension {dims} is not divisible by 32")


class QuantizedLatentCache(LatentCache):
    """LatentCache whose parts are stored MLX-affine quantized, each as (packed uint32, scales,
    biases) grouped along its own last axis (groups of 64, or 32 where 64 does not divide)."""

    def __init__(self, kv_lora_rank: int, rope_dim: int, bits: int = 8):
        super().__init__(kv_lora_rank, rope_dim)
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.group_sizes = (group_size_for(kv_lora_rank), group_size_for(rope_dim))

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple[tuple, tuple]:
        """Append L positions; return ((c_kv packed, scales, biases), (k_pe ...)), each (B, 1, S, ·)."""
        gc, gk = self.group_sizes
        held = self._append([*mx.quantize(c_kv, gc, self.bits), *mx.quantize(k_pe, gk, self.bits)])
        return tuple(held[:3]), tuple(held[3:])

    def dequantize(self, held: tuple[tuple, tuple]) -> tuple[mx.array, mx.array]:
        """(quantized c_kv, quantized k_pe) -> the float parts they stand for."""
        return tuple(
            mx.dequantize(*part, group_size=g, bits=self.bits)
            for part, g in zip(held, self.group_sizes)
        )

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (*LatentCache.meta_state.fget(self), str(self.bits))

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            LatentCache.meta_state.fset(self, value)
            self.bits = int(value[3])
            self.group_sizes = (group_size_for(self.kv_lora_rank), group_size_for(self.rope_dim))


def make_latent_cache(kv_lora_rank: int, rope_dim: int, kv_bits: int | None = None) -> LatentCache:
    if kv_bits is None:
        return LatentCache(kv_lora_rank, rope_dim)
    return QuantizedLatentCache(kv_lora_rank, rope_dim, bits=kv_bits)


# -------------------------------------------------------------------------------- attention


def mla_softmax_scale(qk_head_dim: int, config: dict[str, Any]) -> float:
    """1/√(qk_nope + qk_rope), times mscale² under YaRN with `mscale_all_dim` (DeepSeek)."""
    scale = qk_head_dim**-0.5
    params = rope_config(config)
    if params["rope_type"] != "default":
        mscale_all_dim = params.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = yarn_get_mscale(float(params["factor"]), float(mscale_all_dim))
            scale = scale * m * m
    return scale


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek MLA. `mode`: "auto" (absorbed for decoding and short chunks, materialised for
    long prefills; see `_absorb`), "absorbed" or "materialized" (for tests and benchmarks)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        attention_bias: bool = False,
        rope_config_dict: dict[str, Any] | None = None,
        rope_interleaved: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.q_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.mode = "auto"
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias
        )
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)
        cfg = rope_config_dict or {}
        # checkpoints store the rotary dims as interleaved pairs (traditional RoPE)
        self.rope = make_rope(
            qk_rope_head_dim, cfg, traditional=rope_interleaved, dims=qk_rope_head_dim
        )
        self.scale = mla_softmax_scale(self.q_head_dim, cfg)

    # -- pieces ---------------------------------------------------------------------------

    def _kv_b_weight(self) -> mx.array:
        """kv_b_proj as (H, nope + v, r), dequantized if the layer is quantized."""
        layer = self.kv_b_proj
        if isinstance(layer, nn.QuantizedLinear):
            w = mx.dequantize(
                layer.weight,
                layer.scales,
                layer.get("biases"),
                layer.group_size,
                layer.bits,
                mode=getattr(layer, "mode", "affine"),
            )
        elif hasattr(layer, "dequantized"):  # engine.quant.Fp8Linear: fp8 codes + block scales
            w = layer.dequantized()
        else:
            w = layer.weight
        return w.reshape(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    def _queries(self, x: mx.array) -> mx.array:
        if "q_proj" in self:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self._queries(x).reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)  # (B, H, L, nope | rope)
        ckv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = mx.split(ckv, [self.kv_lora_rank], axis=-1)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # (B, 1, L, r)
        k_pe = k_pe[:, None]  # (B, 1, L, rope), one rotary key shared by all heads
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)

        if cache is not None:
            held = cache.update_and_fetch(c_kv, k_pe)
        else:
            held = (c_kv, k_pe)  # (B, 1, S, r), (B, 1, S, rope)
        absorbed = self._absorb(L)
        if isinstance(held[0], tuple):  # quantized parts
            if absorbed:
                out = self._absorbed_quantized(q_nope, q_pe, held, cache, mask)
            else:
                out = self._materialized(q_nope, q_pe, *cache.dequantize(held), mask)
        elif absorbed:
            out = self._absorbed(q_nope, q_pe, *held, mask)
        else:
            out = self._materialized(q_nope, q_pe, *held, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _absorb(self, L: int) -> bool:
        """Absorbed when cheaper: per cached position and head it costs L·(2r + rope) multiply-adds,
        materialising r·(nope + v) + L·(nope + rope + v). For V2/V3 shapes: L < ~170 queries."""
        if self.mode != "auto":
            return self.mode == "absorbed"
        r, nope, v = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return L == 1 or L * (2 * r - nope - v) < r * (nope + v)

    # -- the two paths ------------------------------------------------------------------

    def _materialized(
        self, q_nope: mx.array, q_pe: mx.array, c_kv: mx.array, k_pe: mx.array, mask: Any
    ) -> mx.array:
        """Per-head K/V from the latent (B, 1, S, r) and k_pe (B, 1, S, rope), for this call only."""
        B, H = q_nope.shape[:2]
        S = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv[:, 0])  # (B, S, H·(nope + v))
        kv = kv.reshape(B, S, H, -1).transpose(0, 2, 1, 3)  # (B, H, S, nope + v)
        k_nope, v = mx.split(kv, [self.qk_nope_head_dim], axis=-1)
        k = mx.concatenate(
            [k_nope, mx.broadcast_to(k_pe, (B, H, S, self.qk_rope_head_dim))], axis=-1
        )
        qf = mx.concatenate([q_nope, q_pe], axis=-1)  # (B, H, L, nope + rope)
        return scaled_dot_product_attention(qf, k, v, self.scale, mask)  # (B, H, L, v)

    def _absorbed(
        self, q_nope: mx.array, q_pe: mx.array, c_kv: mx.array, k_pe: mx.array, mask: Any
    ) -> mx.array:
        """Attention in latent space: scores against c_kv and k_pe, values are c_kv itself."""
        return self._latent_attention(
            q_nope,
            q_pe,
            c_kv.shape[2],
            mask,
            scores=lambda q_lat, q_rot: (
                q_lat @ c_kv.swapaxes(-1, -2) + q_rot @ k_pe.swapaxes(-1, -2)
            ),
            mix=lambda p: p @ c_kv,
        )

    def _absorbed_quantized(
        self, q_nope: mx.array, q_pe: mx.array, held: tuple, cache: QuantizedLatentCache, mask: Any
    ) -> mx.array:
        """`_absorbed` reading the quantized parts through quantized matmuls (no dequantized copy)."""
        (cw, cs, cb), (kw, ks, kb) = held  # each (B, 1, S, ·)
        (gc, gk), bits = cache.group_sizes, cache.bits

        def scores(q_lat, q_rot):
            s = mx.quantized_matmul(q_lat, cw, cs, cb, transpose=True, group_size=gc, bits=bits)
            return s + mx.quantized_matmul(
                q_rot, kw, ks, kb, transpose=True, group_size=gk, bits=bits
            )

        return self._latent_attention(
            q_nope,
            q_pe,
            cw.shape[2],
            mask,
            scores=scores,
            mix=lambda p: mx.quantized_matmul(
                p, cw, cs, cb, transpose=False, group_size=gc, bits=bits
            ),
        )

    def _latent_attention(self, q_nope, q_pe, S: int, mask: Any, scores, mix) -> mx.array:
        """softmax(q_nope·W_UK·c_kvᵀ + q_pe·k_peᵀ)·c_kv, then W_UV: (B, H, L, v).

        All heads share the one latent "head", so they are folded into the rows of a single
        matmul against the cache (B, 1, H·L, ·) instead of broadcasting the cache per head.
        """
        B, H, L, _ = q_nope.shape
        w_uk, w_uv = mx.split(
            self._kv_b_weight(), [self.qk_nope_head_dim], axis=1
        )  # (H, nope|v, r)
        q_lat = (q_nope @ w_uk) * self.scale  # (B, H, L, r)
        q_rot = q_pe * self.scale
        s = scores(q_lat.reshape(B, 1, H * L, -1), q_rot.reshape(B, 1, H * L, -1)).reshape(
            B, H, L, S
        )
        if isinstance(mask, str) and mask == "causal":
            mask = create_causal_mask(L, S - L) if L > 1 else None
        if mask is not None:
            if mask.dtype == mx.bool_:
                s = mx.where(mask, s, mx.array(-math.inf, s.dtype))
            else:
                s = s + mask.astype(s.dtype)
        p = mx.softmax(s.astype(mx.float32), axis=-1, precise=True).astype(q_lat.dtype)
        o_lat = mix(p.reshape(B, 1, H * L, S)).reshape(B, H, L, -1)  # (B, H, L, r)
        return o_lat @ w_uv.swapaxes(-1, -2)  # (B, H, L, v)

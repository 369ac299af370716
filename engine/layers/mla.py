"""Multi-head latent attention (DeepSeek-V2 §2.1) and the latent-only caches it decodes from.

Per token, a layer caches only the normalised latent c_kv (kv_lora_rank values, after
`kv_a_layernorm`) and the rotated shared key k_pe (qk_rope_head_dim values), stored side by side
as one row of kv_lora_rank + qk_rope_head_dim. Two ways to attend over it, same result:

- absorbed (decoding): the key up-projection W_UK is folded into the query
  (q_lat = q_nope·W_UK), so scores are q_lat·c_kv + q_pe·k_pe against the cached rows
  directly, the attention output stays in latent space, and W_UV is applied after it. No
  per-head key or value is ever built.
- materialised (prefill): per-head k_nope and v are built from c_kv through `kv_b_proj` for
  the attention of this call only, then dropped; with many queries this is cheaper.

`LatentCache` keeps the rows in full precision; `QuantizedLatentCache` keeps them MLX-affine
quantized (8 or 4 bits, groups along the row that never straddle the c_kv/k_pe boundary) and the
absorbed path reads them through `mx.quantized_matmul` without dequantizing the whole cache.

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
    """One MLA layer's cache: rows [c_kv | k_pe] in a (B, 1, S, kv_lora_rank + rope_dim) buffer.

    Capacity grows in steps of `step` positions; `nbytes` is what is allocated,
    `bytes_per_token` what one more position costs.
    """

    step = 256

    def __init__(self, kv_lora_rank: int, rope_dim: int) -> None:
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.latent: mx.array | None = None  # (B, 1, capacity, r + rope)
        self.offset = 0

    @property
    def row(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def _grow(self, b: int, dtype: mx.Dtype, needed: int) -> None:
        size = -(-needed // self.step) * self.step
        new = mx.zeros((b, 1, size, self.row), dtype)
        if self.latent is not None and self.offset > 0:
            new[..., : self.offset, :] = self.latent[..., : self.offset, :]
        self.latent = new

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> mx.array:
        """Append c_kv (B, 1, L, r) and k_pe (B, 1, L, rope); return all rows (B, 1, S, r + rope)."""
        rows = mx.concatenate([c_kv, k_pe], axis=-1)
        b, _, n, _ = rows.shape
        end = self.offset + n
        if (
            self.latent is None
            or end > self.latent.shape[2]
            or self.latent.shape[0] != b
            or self.latent.dtype != rows.dtype
        ):
            self._grow(b, rows.dtype, end)
        self.latent[..., self.offset : end, :] = rows
        self.offset = end
        return self.latent[..., :end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.latent is None else self.latent.nbytes

    @property
    def bytes_per_token(self) -> int:
        if self.latent is None:
            return 0
        return self.latent.shape[0] * self.row * self.latent.dtype.size

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.latent is None or self.offset == 0

    @property
    def state(self) -> tuple:
        return () if self.latent is None else (self.latent[..., : self.offset, :],)

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.latent, self.offset = None, 0
            return
        (self.latent,) = value
        self.offset = self.latent.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), str(self.kv_lora_rank), str(self.rope_dim))

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            self.offset, self.kv_lora_rank, self.rope_dim = (int(v) for v in value)


def latent_group_size(kv_lora_rank: int, rope_dim: int) -> int:
    """The largest MLX group size (64, then 32) dividing both parts of a latent row."""
    for g in (64, 32):
        if kv_lora_rank % g == 0 and rope_dim % g == 0:
            return g
    raise ValueError(
        f"quantized latent cache needs kv_lora_rank ({kv_lora_rank}) and qk_rope_head_dim "
        f"({rope_dim}) divisible by 32"
    )


class QuantizedLatentCache(LatentCache):
    """LatentCache whose rows are stored MLX-affine quantized: (packed uint32, scales, biases)."""

    def __init__(self, kv_lora_rank: int, rope_dim: int, bits: int = 8, group_size: int | None = None):
        super().__init__(kv_lora_rank, rope_dim)
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.group_size = group_size or latent_group_size(kv_lora_rank, rope_dim)
        self.quantized: tuple[mx.array, mx.array, mx.array] | None = None

    def _grow(self, b: int, dtype: mx.Dtype, needed: int) -> None:
        size = -(-needed // self.step) * self.step
        words = self.row * self.bits // 32
        groups = self.row // self.group_size
        new = (
            mx.zeros((b, 1, size, words), mx.uint32),
            mx.zeros((b, 1, size, groups), dtype),
            mx.zeros((b, 1, size, groups), dtype),
        )
        if self.quantized is not None and self.offset > 0:
            for old, fresh in zip(self.quantized, new):
                fresh[..., : self.offset, :] = old[..., : self.offset, :]
        self.quantized = new

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Append L positions; return the held rows as (packed, scales, biases), each (B, 1, S, ·)."""
        rows = mx.concatenate([c_kv, k_pe], axis=-1)
        b, _, n, _ = rows.shape
        end = self.offset + n
        q = mx.quantize(rows, self.group_size, self.bits)
        if (
            self.quantized is None
            or end > self.quantized[0].shape[2]
            or self.quantized[0].shape[0] != b
            or self.quantized[1].dtype != rows.dtype
        ):
            self._grow(b, rows.dtype, end)
        for store, new in zip(self.quantized, q):
            store[..., self.offset : end, :] = new
        self.offset = end
        return tuple(t[..., :end, :] for t in self.quantized)

    def dequantize(self, packed: tuple[mx.array, mx.array, mx.array]) -> mx.array:
        return mx.dequantize(*packed, group_size=self.group_size, bits=self.bits)

    @property
    def nbytes(self) -> int:
        return 0 if self.quantized is None else sum(t.nbytes for t in self.quantized)

    @property
    def bytes_per_token(self) -> int:
        if self.quantized is None:
            return 0
        return sum(t.shape[0] * t.shape[-1] * t.dtype.size for t in self.quantized)

    def empty(self) -> bool:
        return self.quantized is None or self.offset == 0

    @property
    def state(self) -> tuple:
        if self.quantized is None:
            return ()
        return tuple(t[..., : self.offset, :] for t in self.quantized)

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.quantized, self.offset = None, 0
            return
        self.quantized = tuple(value)
        self.offset = self.quantized[0].shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (*LatentCache.meta_state.fget(self), str(self.bits), str(self.group_size))

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            self.offset, self.kv_lora_rank, self.rope_dim, self.bits, self.group_size = (
                int(v) for v in value
            )


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
    """DeepSeek MLA. `mode`: "auto" (absorbed for one query, materialised otherwise),
    "absorbed" or "materialized" (for tests and benchmarks)."""

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
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)
        cfg = rope_config_dict or {}
        # checkpoints store the rotary dims as interleaved pairs (traditional RoPE)
        self.rope = make_rope(qk_rope_head_dim, cfg, traditional=rope_interleaved, dims=qk_rope_head_dim)
        self.scale = mla_softmax_scale(self.q_head_dim, cfg)

    # -- pieces ---------------------------------------------------------------------------

    def _kv_b_weight(self) -> mx.array:
        """kv_b_proj as (H, nope + v, r), dequantized if the layer is quantized."""
        layer = self.kv_b_proj
        if isinstance(layer, nn.QuantizedLinear):
            w = mx.dequantize(
                layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
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
            held = mx.concatenate([c_kv, k_pe], axis=-1)  # (B, 1, S, r + rope)
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and L == 1)
        if isinstance(held, tuple):  # quantized rows
            if absorbed:
                out = self._absorbed_quantized(q_nope, q_pe, held, cache, mask)
            else:
                out = self._materialized(q_nope, q_pe, cache.dequantize(held), mask)
        elif absorbed:
            out = self._absorbed(q_nope, q_pe, held, mask)
        else:
            out = self._materialized(q_nope, q_pe, held, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    # -- the two paths ------------------------------------------------------------------

    def _materialized(self, q_nope: mx.array, q_pe: mx.array, rows: mx.array, mask: Any) -> mx.array:
        """Per-head K/V from the latent rows (B, 1, S, r + rope), for this call only."""
        B, H = q_nope.shape[:2]
        S = rows.shape[2]
        c_kv, k_pe = mx.split(rows, [self.kv_lora_rank], axis=-1)
        kv = self.kv_b_proj(c_kv[:, 0])  # (B, S, H·(nope + v))
        kv = kv.reshape(B, S, H, -1).transpose(0, 2, 1, 3)  # (B, H, S, nope + v)
        k_nope, v = mx.split(kv, [self.qk_nope_head_dim], axis=-1)
        k = mx.concatenate([k_nope, mx.broadcast_to(k_pe, (B, H, S, self.qk_rope_head_dim))], axis=-1)
        qf = mx.concatenate([q_nope, q_pe], axis=-1)  # (B, H, L, nope + rope)
        return scaled_dot_product_attention(qf, k, v, self.scale, mask)  # (B, H, L, v)

    def _absorbed(self, q_nope: mx.array, q_pe: mx.array, rows: mx.array, mask: Any) -> mx.array:
        """Attention in latent space: keys are the rows themselves, values their c_kv part."""
        w = self._kv_b_weight()
        w_uk, w_uv = mx.split(w, [self.qk_nope_head_dim], axis=1)  # (H, nope, r), (H, v, r)
        q_lat = q_nope @ w_uk  # (B, H, L, r)
        qf = mx.concatenate([q_lat, q_pe], axis=-1)  # (B, H, L, r + rope)
        o_lat = scaled_dot_product_attention(qf, rows, rows[..., : self.kv_lora_rank], self.scale, mask)
        return o_lat @ w_uv.swapaxes(-1, -2)  # (B, H, L, r) -> (B, H, L, v)

    def _absorbed_quantized(
        self, q_nope: mx.array, q_pe: mx.array, held: tuple, cache: QuantizedLatentCache, mask: Any
    ) -> mx.array:
        """`_absorbed` reading the quantized rows through quantized matmuls."""
        B, H, L, _ = q_nope.shape
        packed, scales, biases = held  # (B, 1, S, ·)
        S = packed.shape[2]
        g, bits = cache.group_size, cache.bits
        w = self._kv_b_weight()
        w_uk, w_uv = mx.split(w, [self.qk_nope_head_dim], axis=1)
        qf = mx.concatenate([q_nope @ w_uk, q_pe], axis=-1) * self.scale
        qf = qf.reshape(B, 1, H * L, -1)  # heads share the one latent "head"
        scores = mx.quantized_matmul(qf, packed, scales, biases, transpose=True, group_size=g, bits=bits)
        scores = scores.reshape(B, H, L, S)
        if isinstance(mask, str) and mask == "causal":
            mask = create_causal_mask(L, S - L) if L > 1 else None
        if mask is not None:
            if mask.dtype == mx.bool_:
                scores = mx.where(mask, scores, mx.array(-math.inf, scores.dtype))
            else:
                scores = scores + mask.astype(scores.dtype)
        p = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(qf.dtype)
        r_words, r_groups = self.kv_lora_rank * bits // 32, self.kv_lora_rank // g
        o_lat = mx.quantized_matmul(
            p.reshape(B, 1, H * L, S), packed[..., :r_words], scales[..., :r_groups],
            biases[..., :r_groups], transpose=False, group_size=g, bits=bits,
        )  # (B, 1, H·L, r)
        return o_lat.reshape(B, H, L, -1) @ w_uv.swapaxes(-1, -2)  # (B, H, L, v)

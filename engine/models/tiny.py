"""The teaching model: a small decoder whose every design choice is a config key.

- `positional`: "rope" (rotate q/k), "alibi" (a per-head distance bias on the scores),
  "sinusoidal" or "learned" (added to the embeddings), "none" (the causal mask alone orders tokens).
- `attention`: "mha", "gqa" (`num_kv_heads` K/V heads shared by groups of query heads), "mla"
  (engine/layers/mla.py: a `kv_lora_rank` latent cached instead of per-head K/V; under a
  positional choice other than "rope" its decoupled rotary key is left unrotated).
- `ffn`: "dense" (GELU MLP) or "moe" (`num_experts` GELU experts, softmax router, top-k with the
  chosen weights renormalised, and the Switch-Transformer load-balancing loss
  E·Σ_e f_e·P_e, read after a forward with `aux_loss()`).
- `norm`: "rmsnorm" | "layernorm"; `pre_norm` (norm → sublayer → add; a final norm) or post-norm
  (add → norm; no final norm); `residual` False drops the skip connections; `causal` False drops
  the causal mask (a demonstration of future leakage, not a usable model).

Weights are named as the numpy reference in engine/inspect_ref.py reads them:
`embed_tokens`, `positions` (learned), `layers.N.{attn_norm,attn,ffn_norm,ffn}`, `norm`,
`lm_head` (only when `tie_word_embeddings` is False). Stacked experts: `ffn.up_proj.weight`
(E, F, D), `ffn.down_proj.weight` (E, D, F), router `ffn.router.weight` (E, D).
This module does not train anything (engine/train/pretrain.py does) and knows no tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.layers.attention import create_attention_mask, scaled_dot_product_attention
from engine.layers.mla import LatentCache, MultiHeadLatentAttention
from engine.layers.mlp import GeluMLP
from engine.layers.norm import LayerNorm, RMSNorm
from engine.layers.positional import LearnedPositions, SinusoidalPositions, alibi_slopes
from engine.layers.rope import RoPE
from engine.models.base import BaseModelArgs

POSITIONAL = ("rope", "alibi", "sinusoidal", "learned", "none")
ATTENTION = ("mha", "gqa", "mla")
FFN = ("dense", "moe")
NORMS = ("rmsnorm", "layernorm")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "tiny"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # gqa only; default num_heads // 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    positional: str = "rope"
    attention: str = "mha"
    ffn: str = "dense"
    norm: str = "rmsnorm"
    pre_norm: bool = True
    residual: bool = True
    causal: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    kv_lora_rank: int = 16  # mla
    qk_rope_head_dim: int = 8  # mla
    num_experts: int = 4  # moe
    top_k: int = 2  # moe
    aux_loss_coef: float = 0.01  # moe load balancing (used by the trainer)
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for key, allowed in (
            ("positional", POSITIONAL),
            ("attention", ATTENTION),
            ("ffn", FFN),
            ("norm", NORMS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size}: not divisible by num_heads={self.num_heads}"
            )
        if self.attention == "mha":
            self.num_kv_heads = self.num_heads
        elif self.attention == "gqa":
            self.num_kv_heads = self.num_kv_heads or max(1, self.num_heads // 2)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads}: must divide num_heads={self.num_heads}"
                )
        if self.ffn == "moe" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}: expected 1..num_experts ({self.num_experts})")


class _NoRotation(nn.Module):
    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return x


class Attention(nn.Module):
    """MHA / GQA with optional RoPE; ALiBi and masks arrive through `mask`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_heads, args.num_kv_heads
        self.head_dim = hd = args.hidden_size // args.num_heads
        self.scale = hd**-0.5
        D = args.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=False)
        self.rope = (
            RoPE(hd, {"rope_type": "default", "rope_theta": args.rope_theta})
            if args.positional == "rope"
            else None
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, d)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.rope is not None:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, self.scale, mask)  # (B, H, L, d)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class _Stacked(nn.Module):
    """One tensor of stacked expert weights (E, out, in), named `weight`."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.weight = mx.random.normal(shape) * shape[-1] ** -0.5


class MoE(nn.Module):
    """Top-k mixture of GELU experts. Every expert runs on every token (tiny sizes: simpler and
    differentiable as is); the top-k weights zero out the rest."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, F = args.num_experts, args.hidden_size, args.intermediate_size
        self.top_k = args.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.up_proj = _Stacked((E, F, D))
        self.down_proj = _Stacked((E, D, F))

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.router(x).astype(mx.float32), axis=-1)  # (B, L, E)
        E = probs.shape[-1]
        ids = mx.stop_gradient(
            mx.argsort(-probs, axis=-1)[..., : self.top_k]
        )  # (B, L, k), best first
        picked = mx.take_along_axis(probs, ids, axis=-1)
        weights = picked / picked.sum(axis=-1, keepdims=True)
        onehot = (ids[..., None] == mx.arange(E)).astype(probs.dtype)  # (B, L, k, E)
        gates = (onehot * weights[..., None]).sum(axis=-2)  # (B, L, E), zero off the top-k
        # load balancing (Switch Transformer): fraction routed f_e times mean probability P_e
        frac = onehot.sum(axis=-2).reshape(-1, E).mean(axis=0) / self.top_k
        object.__setattr__(
            self, "_aux", E * (mx.stop_gradient(frac) * probs.reshape(-1, E).mean(axis=0)).sum()
        )
        object.__setattr__(self, "last_route", (ids, weights))
        up = nn.gelu(mx.einsum("bld,efd->blef", x, self.up_proj.weight))  # (B, L, E, F)
        out = mx.einsum("blef,edf->bled", up, self.down_proj.weight)  # (B, L, E, D)
        return (out * gates[..., None].astype(out.dtype)).sum(axis=-2)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        Norm = RMSNorm if args.norm == "rmsnorm" else LayerNorm
        if args.attention == "mla":
            hd = args.hidden_size // args.num_heads
            self.attn = MultiHeadLatentAttention(
                args.hidden_size,
                args.num_heads,
                args.kv_lora_rank,
                qk_nope_head_dim=hd,
                qk_rope_head_dim=args.qk_rope_head_dim,
                v_head_dim=hd,
                rope_config_dict={"rope_theta": args.rope_theta},
                rope_interleaved=False,
                norm_eps=args.norm_eps,
            )
            if args.positional != "rope":
                self.attn.rope = _NoRotation()
        else:
            self.attn = Attention(args)
        self.ffn = (
            MoE(args)
            if args.ffn == "moe"
            else GeluMLP(args.hidden_size, args.intermediate_size, bias=False, act="gelu")
        )
        self.attn_norm = Norm(args.hidden_size, args.norm_eps)
        self.ffn_norm = Norm(args.hidden_size, args.norm_eps)
        self.pre, self.residual = args.pre_norm, args.residual

    def _sub(self, x: mx.array, norm: nn.Module, fn) -> mx.array:
        if self.pre:
            y = fn(norm(x))
            return x + y if self.residual else y
        y = fn(x)
        return norm(x + y if self.residual else y)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        x = self._sub(x, self.attn_norm, lambda h: self.attn(h, mask, cache))
        return self._sub(x, self.ffn_norm, self.ffn)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        D = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, D)
        self.embed_tokens.weight = mx.random.normal((args.vocab_size, D)) * 0.02
        if args.positional == "learned":
            self.positions = LearnedPositions(args.max_position_embeddings, D)
        self._sinusoidal = SinusoidalPositions(D) if args.positional == "sinusoidal" else None
        self.layers = [Block(args) for _ in range(args.num_layers)]
        if args.pre_norm:
            self.norm = (RMSNorm if args.norm == "rmsnorm" else LayerNorm)(D, args.norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(D, args.vocab_size, bias=False)

    def _mask(self, h: mx.array, cache: Any, mask: Any) -> Any:
        a = self.args
        L = h.shape[1]
        offset = cache.offset if cache is not None else 0
        if a.positional == "alibi":
            q = mx.arange(offset, offset + L)[:, None]
            k = mx.arange(offset + L)[None]
            dist = (q - k).astype(mx.float32)  # (L, S)
            bias = -alibi_slopes(a.num_heads)[:, None, None] * mx.abs(dist)[None]  # (H, L, S)
            allowed = dist >= 0 if a.causal else mx.ones(dist.shape, mx.bool_)
            if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
                allowed = allowed & mask
            out = mx.where(allowed, bias, -math.inf)  # (H, L, S) or (B, H, L, S) with padding
            return (out[None] if out.ndim == 3 else out).astype(h.dtype)
        if mask is not None:
            return mask
        return create_attention_mask(h, cache) if a.causal else None

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        h = self.embed_tokens(inputs)
        offset = cache[0].offset if cache is not None else 0
        if "positions" in self:
            h = self.positions(h, offset)
        elif self._sinusoidal is not None:
            h = self._sinusoidal(h, offset)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = self._mask(h, cache[0], mask)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if "norm" in self:
            h = self.norm(h)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.embed_tokens.as_linear(h)

    def aux_loss(self) -> mx.array:
        """Sum over MoE layers of the load-balancing loss of the last forward (0 when dense)."""
        total = mx.array(0.0)
        for layer in self.layers:
            aux = getattr(layer.ffn, "_aux", None)
            if aux is not None:
                total = total + aux
        return total

    def make_cache(self, kv_bits: int | None = None) -> list:
        if self.args.attention == "mla":
            return [
                LatentCache(self.args.kv_lora_rank, self.args.qk_rope_head_dim) for _ in self.layers
            ]
        from engine.cache import make_kv_caches

        return make_kv_caches(len(self.layers), kv_bits or None)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

"""Llama-family decoder (also mistral, and the base of qwen2/qwen3 by flags).

RMSNorm pre-norm blocks, grouped-query attention with RoPE (all variants in layers/rope.py),
SwiGLU MLP, optional tied embeddings. Flags cover the relatives: `attention_bias` (qwen2 sets
q/k/v bias), `qk_norm` (qwen3's per-head RMSNorm on q and k before RoPE), `sliding_window`.
Attribute names equal HF checkpoint keys, so `load_weights` needs no mapping; GGUF names are
mapped in engine/loading.py before `sanitize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.layers.attention import (
    create_attention_mask,
    create_causal_mask,
    scaled_dot_product_attention,
)
from engine.layers.fused import fused_decode
from engine.layers.mlp import SwiGLU
from engine.layers.norm import RMSNorm
from engine.layers.rope import make_rope
from engine.models.base import BaseModelArgs, KVCacheModel, head_dim_of


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    partial_rotary_factor: float | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool | None = None  # None: same as attention_bias (llama); qwen2 sets False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    use_sliding_window: bool | None = None
    rope_traditional: bool = False  # interleaved pairs (GGUF layout) instead of half-split

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    def rope_dict(self) -> dict[str, Any]:
        return {
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": self.rope_parameters,
            "partial_rotary_factor": self.partial_rotary_factor,
            "max_position_embeddings": self.max_position_embeddings,
        }

    @property
    def window(self) -> int | None:
        if self.use_sliding_window is False:
            return None
        return self.sliding_window


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = head_dim_of(args)
        self.scale = hd**-0.5
        bias = args.attention_bias
        o_bias = bias if args.o_bias is None else args.o_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        self.rope = make_rope(hd, args.rope_dict(), traditional=args.rope_traditional)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)  # (B, L, H, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, self.scale, mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self._window = args.window

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0], self._window)
        elif self._window is not None and isinstance(mask, mx.array):
            # a caller's padding mask still has to respect the sliding window
            offset = cache[0].offset if cache[0] is not None else 0
            mask = mask & create_causal_mask(h.shape[1], offset, window_size=self._window)
        if mask is None:
            fused = fused_decode(self.layers, h, cache)  # one token on our CPU kernels
            if fused is not None:
                return self.norm(fused)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(KVCacheModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        h = self.model(inputs, cache, mask)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # rotary tables saved by some exporters are recomputed here, never loaded
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

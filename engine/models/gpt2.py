"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv projection, GELU (tanh) MLP.

HF checkpoints store the projections as Conv1D, i.e. weight (in, out); `sanitize` transposes them
to Linear's (out, in) once, so the forward is plain `nn.Linear`. Names follow the checkpoint
(`transformer.h.N.attn.c_attn`, ...). No RoPE; attention uses the shared SDPA and KVCache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.layers.attention import create_attention_mask, scaled_dot_product_attention
from engine.layers.mlp import activation
from engine.layers.norm import LayerNorm
from engine.models.base import BaseModelArgs, KVCacheModel


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "gpt2"
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 1024
    n_inner: int | None = None
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.n_heads = args.n_head
        self.head_dim = args.n_embd // args.n_head
        self.scale = self.head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd, bias=True)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd, bias=True)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.c_attn(x).reshape(B, L, 3, self.n_heads, self.head_dim)  # (B, L, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, L, D)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, self.scale, mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inner = args.n_inner or 4 * args.n_embd
        self.c_fc = nn.Linear(args.n_embd, inner, bias=True)
        self.c_proj = nn.Linear(inner, args.n_embd, bias=True)
        self._act = activation(args.activation_function)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self._act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(args.n_embd, args.layer_norm_epsilon)
        self.attn = Attention(args, layer_idx)
        self.ln_2 = LayerNorm(args.n_embd, args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.attn(self.ln_1(x), mask, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [Block(args, i) for i in range(args.n_layer)]
        self.ln_f = LayerNorm(args.n_embd, args.layer_norm_epsilon)

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        L = inputs.shape[1]
        offset = cache[0].offset if cache is not None else 0
        positions = mx.arange(offset, offset + L)
        h = self.wte(inputs) + self.wpe(positions)[None]
        if cache is None:
            cache = [None] * len(self.h)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        for block, c in zip(self.h, cache):
            h = block(h, mask, c)
        return self.ln_f(h)


class Model(KVCacheModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = GPT2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        h = self.transformer(inputs, cache, mask)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.transformer.wte.as_linear(h)

    @property
    def layers(self) -> list:
        return self.transformer.h

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for k, v in weights.items():
            # old checkpoints store the causal mask as buffers; we build masks ourselves
            if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
                continue
            if not k.startswith("transformer.") and not k.startswith("lm_head."):
                k = "transformer." + k  # GPT2Model checkpoints (no LM head wrapper)
            out[k] = v
        # Conv1D stores (in, out); c_attn's non-square shape tells which layout this file uses
        c_attn = out.get("transformer.h.0.attn.c_attn.weight")
        n_embd = self.args.n_embd
        if (
            c_attn is not None
            and c_attn.dtype != mx.uint32
            and tuple(c_attn.shape) == (n_embd, 3 * n_embd)
        ):
            for k in list(out):
                if (
                    k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                    and out[k].ndim == 2
                ):
                    out[k] = out[k].T
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

"""Mixtral: the llama decoder with a sparse MoE feed-forward (`block_sparse_moe`).

Attention is llama's (GQA, RoPE, optional sliding window). Each block's FFN routes every token to
`num_experts_per_tok` of `num_local_experts` SwiGLU experts: softmax over the router logits, top-k,
weights renormalised to sum to 1. Experts run stacked through `engine.layers.moe.SwitchGLU`;
`sanitize` stacks the checkpoint's `experts.{i}.w1/w3/w2` into `switch_mlp.gate/up/down_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.errors import ModelLoadError
from engine.layers.moe import (
    RouterCapture,
    RouterSpec,
    SwitchGLU,
    combine,
    route,
    set_capture,
    stack_experts,
)
from engine.layers.norm import RMSNorm
from engine.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "mixtral"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float | None = 1000000.0

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok}: expected 1..num_local_experts "
                f"({self.num_local_experts})"
            )


class SparseMoeBlock(nn.Module):
    """Router `gate` (a plain, quantizable linear) + stacked experts `switch_mlp`."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.spec = RouterSpec(top_k=args.num_experts_per_tok, norm_topk_prob=True)
        self.layer_idx = layer_idx
        self._capture: RouterCapture | None = None
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.intermediate_size, args.num_local_experts, args.hidden_act
        )

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        inds, weights = route(self.gate(flat), self.spec)
        if self._capture is not None:
            self._capture.add(
                self.layer_idx, inds.reshape(*shape[:-1], -1), weights.reshape(*shape[:-1], -1)
            )
        return combine(self.switch_mlp(flat, inds), weights).reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = llama.Attention(args)
        self.block_sparse_moe = SparseMoeBlock(args, layer_idx)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralModel(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self._window = args.window


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = MixtralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def capture(self) -> RouterCapture | None:
        """Router choices of every MoE layer are appended here while set (None: off, free)."""
        return getattr(self, "_router_capture", None)

    @capture.setter
    def capture(self, value: RouterCapture | None) -> None:
        object.__setattr__(self, "_router_capture", value)
        set_capture(self, value)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        n = self.args.num_local_experts
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.block_sparse_moe"
            if f"{prefix}.switch_mlp.gate_proj.weight" in weights:
                continue
            try:
                stack_experts(
                    weights,
                    prefix,
                    n,
                    {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
                    f"{prefix}.switch_mlp",
                )
            except KeyError as e:
                raise ModelLoadError(
                    f"{e.args[0]}: missing; config num_local_experts={n} expects experts 0..{n - 1}"
                ) from None
        return weights

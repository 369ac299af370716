"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention + routed experts + a gated shared expert.

Attention is Qwen2's (llama with q/k/v bias). A block's FFN is sparse when the layer is not in
`mlp_only_layers` and `(layer + 1) % decoder_sparse_step == 0`, else a dense SwiGLU of
`intermediate_size`. Sparse: softmax router, top-`num_experts_per_tok` of `num_experts` (weights
renormalised only if `norm_topk_prob`), experts of `moe_intermediate_size`, plus `shared_expert`
(`shared_expert_intermediate_size`) scaled per token by sigmoid(`shared_expert_gate`(x)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.errors import ModelLoadError
from engine.layers.mlp import SwiGLU
from engine.layers.moe import RouterCapture, RouterSpec, SwitchGLU, combine, route, stack_experts
from engine.layers.norm import RMSNorm
from engine.models import llama, mixtral, qwen2


@dataclass
class ModelArgs(qwen2.ModelArgs):
    model_type: str = "qwen2_moe"
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = False
    qkv_bias: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.qkv_bias is not None:
            self.attention_bias = bool(self.qkv_bias)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok}: expected 1..num_experts ({self.num_experts})"
            )

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.spec = RouterSpec(top_k=args.num_experts_per_tok, norm_topk_prob=args.norm_topk_prob)
        self.layer_idx = layer_idx
        self._capture: RouterCapture | None = None
        d = args.hidden_size
        self.gate = nn.Linear(d, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(
            d, args.moe_intermediate_size, args.num_experts, args.hidden_act
        )
        self.shared_expert = SwiGLU(d, args.shared_expert_intermediate_size, act=args.hidden_act)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        inds, weights = route(self.gate(flat), self.spec)
        if self._capture is not None:
            self._capture.add(
                self.layer_idx, inds.reshape(*shape[:-1], -1), weights.reshape(*shape[:-1], -1)
            )
        y = combine(self.switch_mlp(flat, inds), weights).reshape(shape)
        return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = llama.Attention(args)
        if args.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(args, layer_idx)
        else:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, act=args.hidden_act)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2MoeModel(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self._window = args.window


class Model(mixtral.Model):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen2MoeModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = llama.Model.sanitize(self, weights)
        n = self.args.num_experts
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp"
            if not self.args.is_moe_layer(i) or f"{prefix}.switch_mlp.gate_proj.weight" in weights:
                continue
            names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
            try:
                stack_experts(weights, prefix, n, names, f"{prefix}.switch_mlp")
            except KeyError as e:
                raise ModelLoadError(
                    f"{e.args[0]}: missing; config num_experts={n} expects experts 0..{n - 1}"
                ) from None
        return weights

"""DeepSeek-V2 (and, through `deepseek_v3.py`, V3): latent attention + mixture of experts.

Each block is pre-norm: multi-head latent attention (engine/layers/mla.py, latent-only cache),
then a dense SwiGLU for the first `first_k_dense_replace` layers (and layers off the
`moe_layer_freq` beat) or a DeepSeek MoE (engine/layers/moe.py): shared experts always on plus
`num_experts_per_tok` routed experts picked by the router (`topk_method`, `scoring_func`,
groups, `e_score_correction_bias`, `norm_topk_prob`, `routed_scaling_factor`).

Every config key that changes the math is read here; `sanitize` stacks per-expert tensors into
`mlp.switch_mlp.*`, drops what inference does not use (multi-token-prediction layers, rotary
tables) and checks the checkpoint's dimensions against the config, naming the key at fault.
Router semantics follow DeepSeek's reference code: V2 scales only un-normalised weights by
`routed_scaling_factor`; V3 normalises (if asked) and then scales. (transformers' V2 ignores
`norm_topk_prob`; both released V2 checkpoints set it false, where all three agree.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.errors import ModelLoadError
from engine.layers.attention import create_attention_mask
from engine.layers.mla import MultiHeadLatentAttention, make_latent_cache
from engine.layers.mlp import SwiGLU
from engine.layers.moe import (
    SCORING_FUNCS,
    TOPK_METHODS,
    MoE,
    RouterCapture,
    RouterSpec,
    set_capture,
    stack_experts,
)
from engine.layers.norm import RMSNorm
from engine.models.base import BaseModelArgs, KVCacheModel


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v2"
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # unused by MLA; kept so configs round-trip
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    # V2's reference code multiplies by routed_scaling_factor only when it does not normalise.
    scale_normalized = False

    def __post_init__(self) -> None:
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(
                f"topk_method={self.topk_method!r}: expected one of {', '.join(TOPK_METHODS)}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"scoring_func={self.scoring_func!r}: expected one of {', '.join(SCORING_FUNCS)}"
            )
        for key in (
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "num_attention_heads",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected a positive integer")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim}: expected an even number")
        if self.n_routed_experts:
            k = self.num_experts_per_tok
            if not k or k > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok={k!r}: expected 1..n_routed_experts ({self.n_routed_experts})"
                )
            if self.topk_method != "greedy":
                g, tg = self.n_group or 1, self.topk_group or 1
                if self.n_routed_experts % g:
                    raise ValueError(
                        f"n_group={g}: expected a divisor of n_routed_experts ({self.n_routed_experts})"
                    )
                if not 1 <= tg <= g:
                    raise ValueError(f"topk_group={tg}: expected 1..n_group ({g})")
                if tg * (self.n_routed_experts // g) < k:
                    raise ValueError(
                        f"topk_group={tg}: its groups hold fewer than num_experts_per_tok={k} experts"
                    )

    def rope_dict(self) -> dict[str, Any]:
        return {
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": self.rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
        }

    def router_spec(self) -> RouterSpec:
        return RouterSpec(
            top_k=self.num_experts_per_tok,
            scoring_func=self.scoring_func,
            topk_method=self.topk_method,
            n_group=self.n_group or 1,
            topk_group=self.topk_group or 1,
            norm_topk_prob=bool(self.norm_topk_prob),
            routed_scaling_factor=float(self.routed_scaling_factor),
            scale_normalized=self.scale_normalized,
        )

    def is_moe_layer(self, i: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(
            args.hidden_size,
            args.num_attention_heads,
            args.kv_lora_rank,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
            q_lora_rank=args.q_lora_rank,
            attention_bias=args.attention_bias,
            rope_config_dict=args.rope_dict(),
            rope_interleaved=args.rope_interleave,
        )
        if args.is_moe_layer(layer_idx):
            self.mlp = MoE(
                args.hidden_size,
                args.moe_intermediate_size,
                args.n_routed_experts,
                args.router_spec(),
                n_shared_experts=args.n_shared_experts,
                act=args.hidden_act,
                layer_idx=layer_idx,
                correction_bias=args.topk_method == "noaux_tc",
                shared_cls=SwiGLU,
            )
        else:
            self.mlp = SwiGLU(
                args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act
            )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(KVCacheModel, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekModel(args)
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

    @property
    def capture(self) -> RouterCapture | None:
        """Router choices of every MoE layer are appended here while set (None: off, free)."""
        return getattr(self, "_router_capture", None)

    @capture.setter
    def capture(self, value: RouterCapture | None) -> None:
        object.__setattr__(self, "_router_capture", value)
        set_capture(self, value)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """One latent cache per layer, quantized to `kv_bits` (8 or 4; 0 forces full precision;
        None takes the `kv_bits` given to `engine.load`)."""
        a = self.args
        bits = self.cache_bits(kv_bits)
        return [make_latent_cache(a.kv_lora_rank, a.qk_rope_head_dim, bits) for _ in self.layers]

    # -- checkpoint quirks -----------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        a = self.args
        n_layers = a.num_hidden_layers
        out = {}
        for k, v in weights.items():
            if "rotary_emb.inv_freq" in k:
                continue
            m = re.match(r"model\.layers\.(\d+)\.", k)
            if m and int(m.group(1)) >= n_layers:
                continue  # multi-token-prediction layers (V3) are for training
            out[k] = v
        if a.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        for i in range(n_layers):
            if a.is_moe_layer(i):
                _stack_layer_experts(out, f"model.layers.{i}.mlp", a.n_routed_experts)
            self._check_attention_dims(out, f"model.layers.{i}.self_attn")
        return out

    def _check_attention_dims(self, weights: dict[str, mx.array], prefix: str) -> None:
        """Rows of each MLA projection against the config's head dims (rows survive quantization)."""
        a = self.args
        h, nope, rope, v, r = (
            a.num_attention_heads,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
        )
        expect = {
            "kv_a_proj_with_mqa": (r + rope, f"kv_lora_rank={r} + qk_rope_head_dim={rope}"),
            "kv_b_proj": (
                h * (nope + v),
                f"num_attention_heads={h} x (qk_nope_head_dim={nope} + v_head_dim={v})",
            ),
            "q_proj": (
                h * (nope + rope),
                f"num_attention_heads={h} x (qk_nope_head_dim={nope} + qk_rope_head_dim={rope})",
            ),
            "q_b_proj": (
                h * (nope + rope),
                f"num_attention_heads={h} x (qk_nope_head_dim={nope} + qk_rope_head_dim={rope})",
            ),
        }
        for name, (rows, why) in expect.items():
            w = weights.get(f"{prefix}.{name}.weight")
            if w is not None and w.shape[0] != rows:
                raise ModelLoadError(
                    f"{prefix}.{name}.weight: has {w.shape[0]} rows; config expects {why} = {rows}"
                )
        w = weights.get(f"{prefix}.kv_b_proj.weight")
        if w is not None and w.dtype != mx.uint32 and w.shape[1] != r:
            raise ModelLoadError(
                f"{prefix}.kv_b_proj.weight: has {w.shape[1]} columns; config expects kv_lora_rank = {r}"
            )
        w = weights.get(f"{prefix}.o_proj.weight")
        if w is not None and w.dtype != mx.uint32 and w.shape[1] != h * v:
            raise ModelLoadError(
                f"{prefix}.o_proj.weight: has {w.shape[1]} columns; config expects "
                f"num_attention_heads={h} x v_head_dim={v} = {h * v}"
            )
        if self.args.q_lora_rank is None and f"{prefix}.q_a_proj.weight" in weights:
            raise ModelLoadError(
                f"{prefix}.q_a_proj.weight: present, but config q_lora_rank=None expects a plain q_proj"
            )
        if self.args.q_lora_rank is not None and f"{prefix}.q_proj.weight" in weights:
            raise ModelLoadError(
                f"{prefix}.q_proj.weight: present, but config q_lora_rank={self.args.q_lora_rank} "
                "expects q_a_proj/q_b_proj"
            )


def _stack_layer_experts(weights: dict[str, mx.array], prefix: str, n_experts: int) -> None:
    """mlp.experts.{i}.{gate,up,down}_proj.* (or transformers' fused tensors) -> mlp.switch_mlp.*."""
    fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
    if fused is not None:  # transformers' in-memory layout: (E, 2I, D) and (E, D, I)
        gate, up = mx.split(fused, 2, axis=1)
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(
            f"{prefix}.experts.down_proj"
        )
        return
    if f"{prefix}.switch_mlp.gate_proj.weight" in weights:
        return  # already stacked (mlx-community conversions)
    names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    try:
        stack_experts(
            weights,
            prefix,
            n_experts,
            names,
            f"{prefix}.switch_mlp",
            ("weight", "scales", "biases", "weight_scale_inv"),
        )
    except KeyError as e:
        raise ModelLoadError(
            f"{e.args[0]}: missing; config n_routed_experts={n_experts} expects experts 0..{n_experts - 1}"
        ) from None
    for name in names.values():
        if f"{prefix}.switch_mlp.{name}.weight" not in weights:
            raise ModelLoadError(
                f"{prefix}.experts.0.{name}.weight: missing; config n_routed_experts={n_experts} "
                f"expects experts 0..{n_experts - 1}"
            )

"""DeepSeek-V3 (also R1, V3.1): the V2 architecture with V3's defaults and router.

Same latent attention and MoE code as `deepseek_v2.py`; what differs is read from the config:
sigmoid scores, `noaux_tc` selection (groups ranked by the sum of their two best bias-corrected
scores, `e_score_correction_bias` steering the choice only), weights normalised when
`norm_topk_prob` and then multiplied by `routed_scaling_factor`, `first_k_dense_replace` dense
layers, and a `rope_interleave` flag for the rotary layout. FP8 block-scaled weights are the
quant package's business (engine/quant/), not this file's.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models import deepseek_v2
from engine.models.deepseek_v2 import DecoderLayer, DeepseekModel  # noqa: F401  (re-exported)


@dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    max_position_embeddings: int = 4096

    # V3 normalises (when asked) and then always scales.
    scale_normalized = True


class Model(deepseek_v2.Model):
    pass

"""Qwen3: the llama decoder with RMSNorm over each head of q and k before RoPE (`q_norm`,
`k_norm`) and an explicit `head_dim` (not hidden_size / heads). No q/k/v bias by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen3"
    qk_norm: bool = True
    rope_theta: float | None = 1000000.0


class Model(llama.Model):
    pass

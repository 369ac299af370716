"""Qwen2: the llama decoder with a bias on the q/k/v projections (none on o_proj).

Everything else (GQA, RoPE, SwiGLU, RMSNorm, tied embeddings in small sizes) is llama's; only
the defaults differ, since Qwen2 configs do not carry an `attention_bias` key.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"
    attention_bias: bool = True
    o_bias: bool | None = False
    rope_theta: float | None = 1000000.0


class Model(llama.Model):
    pass

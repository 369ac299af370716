"""Normalisation layers with checkpoint-named parameters (`weight`, `bias`).

RMSNorm (llama family, also used per head for qwen3's q/k norm) and LayerNorm (gpt2), both
through `mx.fast` kernels (RMSNorm through our CPU kernel on the CPU, engine/quant/cpu.py).
Statistics are taken in fp32 by those kernels whatever the input dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.quant.cpu import cpu_kernels_for


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        kern = cpu_kernels_for(x, self.weight)
        if kern is not None:
            return kern.rms_norm(x, self.weight, self.eps)  # MLX's CPU path is a composed graph
        return mx.fast.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.get("bias"), self.eps)

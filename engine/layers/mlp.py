"""Feed-forward blocks: SwiGLU (llama family) and a plain GELU MLP, plus the activations by name.

Attribute names follow HF llama checkpoints (`gate_proj`, `up_proj`, `down_proj`); gpt2's
`c_fc`/`c_proj` block lives in engine/models/gpt2.py and only borrows `ACTIVATIONS` from here.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from engine.quant.cpu import cpu_kernels_for


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (HF "gelu_new", "gelu_pytorch_tanh")."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": nn.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}"
        ) from None


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)
        self._act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        kern = cpu_kernels_for(g, u) if self._act is nn.silu else None
        if kern is not None:
            # one threaded SIMD op; MLX's CPU sigmoid runs a scalar exp (~30 M elements/s)
            return self.down_proj(kern.swiglu(g, u))
        return self.down_proj(self._act(g) * u)


class GeluMLP(nn.Module):
    """down(gelu(up(x))), HF names `up_proj`/`down_proj`."""

    def __init__(self, dims: int, hidden_dims: int, bias: bool = True, act: str = "gelu_new"):
        super().__init__()
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)
        self._act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._act(self.up_proj(x)))

"""Device and compute-dtype policy: fp32 on the CPU, fp16 on a GPU (Metal or CUDA).

MLX-CPU fp16 matmuls measured 5-40x slower than fp32 on our Linux machines, so activations and
unquantized weights are computed in fp32 there; stored quantized weights keep their format.
"""

from __future__ import annotations

import os

import mlx.core as mx


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available() or _cuda_available()


def _cuda_available() -> bool:
    try:
        return mx.default_device() == mx.gpu and bool(getattr(mx, "cuda", None)) and mx.cuda.is_available()
    except Exception:
        return False


def compute_dtype() -> mx.Dtype:
    forced = os.environ.get("LATENT_DTYPE")
    if forced:
        return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[forced]
    return mx.float16 if on_gpu() else mx.float32


def backend_name() -> str:
    if mx.metal.is_available():
        return "metal"
    if _cuda_available():
        return "cuda"
    return "cpu"

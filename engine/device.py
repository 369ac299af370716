"""Device and compute-dtype policy: fp32 on the CPU, fp16 on a GPU (Metal or CUDA).

MLX-CPU fp16 matmuls measured 5-40x slower than fp32 on our Linux machines, so activations and
unquantized weights are computed in fp32 there; stored quantized weights keep their packed
format (only their float scales/biases follow the compute dtype). `LATENT_DTYPE` overrides.
This is the one piece of global policy in the engine; it knows nothing about models.
"""

from __future__ import annotations

import os

import mlx.core as mx

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _cuda_available() -> bool:
    try:
        return bool(getattr(mx, "cuda", None)) and bool(mx.cuda.is_available())
    except Exception:
        return False


def _metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


def on_gpu() -> bool:
    """True when MLX's default device is a GPU (Metal or CUDA) that is actually present."""
    return mx.default_device() == mx.gpu and (_metal_available() or _cuda_available())


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype | None:
    if name is None or isinstance(name, mx.Dtype):
        return name
    key = str(name).replace("mlx.core.", "").lower()
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(
        key, key
    )
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[key]


def compute_dtype() -> mx.Dtype:
    forced = os.environ.get("LATENT_DTYPE")
    if forced:
        return parse_dtype(forced)
    return mx.float16 if on_gpu() else mx.float32


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def cast_weights(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating tensors to `dtype`; packed integer tensors (quantized weights) untouched."""
    return {
        k: v.astype(dtype)
        if mx.issubdtype(v.dtype, mx.floating)
        and v.dtype != dtype
        and not k.endswith(".weight_scale_inv")
        else v  # fp8 block scales stay float32
        for k, v in weights.items()
    }


def backend_name() -> str:
    if _metal_available():
        return "metal"
    if _cuda_available():
        return "cuda"
    return "cpu"

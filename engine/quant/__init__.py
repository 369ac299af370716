"""Quantized weight formats and the swap of plain layers for quantized ones.

`prepare_model(model, weights, config)` runs before `model.load_weights(...)`: it looks at which
tensors a checkpoint holds for each layer and replaces that layer by the matching quantized
module, so loading needs no per-format code in the model files.
- `<layer>.scales` (+ `.biases`): MLX affine 4/8-bit (also GGUF Q4_0/Q4_1/Q8_0 as MLX loads them).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.errors import QuantError


def _affine_params(path: str, module: nn.Module, weights: dict[str, mx.array], config: dict):
    """bits and group size of one affine-quantized layer, read off its packed shapes."""
    w = weights[f"{path}.weight"]
    scales = weights[f"{path}.scales"]
    if isinstance(module, nn.Linear):
        in_features = module.weight.shape[1]
    elif isinstance(module, nn.Embedding):
        in_features = module.weight.shape[1]
    else:
        raise QuantError(f"{path}: quantized tensors found for a {type(module).__name__}")
    if w.dtype != mx.uint32:
        raise QuantError(f"{path}.weight: packed affine weights must be uint32, got {w.dtype}")
    bits = (w.shape[-1] * 32) // in_features
    group_size = in_features // scales.shape[-1] if scales.shape[-1] else 0
    q = config.get("quantization") or config.get("quantization_config") or {}
    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise QuantError(
            f"{path}: unsupported affine layout (bits={bits}, group_size={group_size}; "
            f"config says {q or 'nothing'})"
        )
    return {"group_size": group_size, "bits": bits}


def prepare_model(model: nn.Module, weights: dict[str, mx.array], config: dict) -> None:
    """Swap layers for quantized ones according to the tensors present in `weights`."""
    if any(k.endswith(".scales") for k in weights):

        def predicate(path: str, module: nn.Module):
            if f"{path}.scales" not in weights:
                return False
            return _affine_params(path, module, weights, config)

        nn.quantize(model, class_predicate=predicate)

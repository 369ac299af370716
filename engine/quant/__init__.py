"""Quantized weight formats and the swap of plain layers for quantized ones.

`prepare_model(model, weights, config)` runs before `model.load_weights(...)`: it looks at which
tensors a checkpoint holds for each layer and replaces that layer by the matching quantized
module, so loading needs no per-format code in the model files.
- `<layer>.scales` (+ `.biases`): MLX affine 4/8-bit (also GGUF Q4_0/Q4_1/Q8_0 as MLX loads them).
- `<layer>.weight_scale_inv`: fp8 e4m3 with 2-D block scales (DeepSeek-V3) → `Fp8Linear`, one
  byte per parameter at runtime. Block size from `quantization_config.weight_block_size`.
Malformed layouts raise `QuantError` naming the tensor. The formats themselves live in
`fp8.py` / `affine.py`; the arithmetic in `kernels/`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from engine.errors import QuantError
from engine.quant.fp8 import (
    DEFAULT_BLOCK,
    Fp8Linear,
    Fp8SwitchLinear,
    quantize_fp8_blocks,
    scale_shape,
)
from engine.quant.safetensors_fp8 import fp8_header_check, save_safetensors

__all__ = [
    "prepare_model",
    "Fp8SwitchLinear",
    "Fp8Linear",
    "quantize_fp8_blocks",
    "fp8_header_check",
    "save_safetensors",
    "fp8_block_size",
]


def _affine_params(path: str, module: nn.Module, weights: dict[str, mx.array], config: dict):
    """bits and group size of one affine-quantized layer, read off its packed shapes."""
    w = weights[f"{path}.weight"]
    scales = weights[f"{path}.scales"]
    if isinstance(module, nn.Linear):
        in_features = module.weight.shape[1]
    elif isinstance(module, nn.Embedding):
        in_features = module.weight.shape[1]
    elif hasattr(module, "to_quantized") and "weight" in module:  # stacked experts (E, out, in)
        in_features = module.weight.shape[-1]
    else:
        raise QuantError(f"{path}: quantized tensors found for a {type(module).__name__}")
    if w.dtype != mx.uint32:
        raise QuantError(f"{path}.weight: packed affine weights must be uint32, got {w.dtype}")
    bits = (w.shape[-1] * 32) // in_features
    group_size = in_features // scales.shape[-1] if scales.shape[-1] else 0
    q = config.get("quantization") or config.get("quantization_config") or {}
    if w.shape[-1] * 32 != bits * in_features:
        raise QuantError(
            f"{path}.weight: packed width {w.shape[-1]} x 32 bits is not a whole bit width "
            f"for {in_features} inputs"
        )
    if isinstance(q.get("bits"), int) and q["bits"] != bits and f"{path}" not in q:
        raise QuantError(f"{path}.weight: packed as {bits}-bit but config says bits={q['bits']}")
    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise QuantError(
            f"{path}: unsupported affine layout (bits={bits}, group_size={group_size}; "
            f"config says {q or 'nothing'})"
        )
    return {"group_size": group_size, "bits": bits}


def fp8_block_size(config: dict) -> tuple[int, int]:
    """The fp8 scale block (rows, cols): `quantization_config.weight_block_size`, else 128x128."""
    q = config.get("quantization_config") or config.get("quantization") or {}
    bs = q.get("weight_block_size") if isinstance(q, dict) else None
    if bs is None:
        return DEFAULT_BLOCK
    if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(int(b) > 0 for b in bs)):
        raise QuantError(
            f"config.json: quantization_config.weight_block_size={bs!r} is not [rows, cols]"
        )
    return (int(bs[0]), int(bs[1]))


def _check_fp8_tensors(weights: dict[str, mx.array], block: tuple[int, int]) -> set[str]:
    """Paths of the fp8 layers; QuantError for codes without scales and malformed scales."""
    paths = set()
    for key, w in weights.items():
        if key.endswith(".weight_scale_inv"):
            path = key[: -len(".weight_scale_inv")]
            wk = f"{path}.weight"
            if wk not in weights:
                raise QuantError(f"{key}: block scales without the fp8 weight {wk}")
            weight = weights[wk]
            if weight.dtype != mx.uint8:
                raise QuantError(
                    f"{wk}: expected fp8 e4m3 codes (1 byte) next to {key}, got {weight.dtype}"
                )
            if weight.ndim not in (2, 3):
                raise QuantError(
                    f"{wk}: fp8 weights must be 2-D (3-D for stacked experts), got {tuple(weight.shape)}"
                )
            want = tuple(weight.shape[:-2]) + scale_shape(tuple(weight.shape[-2:]), block)
            if tuple(w.shape) != want:
                raise QuantError(
                    f"{key}: scale shape {tuple(w.shape)} does not match weight {tuple(weight.shape)} "
                    f"in {block[0]}x{block[1]} blocks (expected {want})"
                )
            if not mx.issubdtype(w.dtype, mx.floating):
                raise QuantError(f"{key}: scales must be floating point, got {w.dtype}")
            paths.add(path)
        elif key.endswith(".weight") and w.dtype in (mx.uint8, mx.int8):
            path = key[: -len(".weight")]
            if f"{path}.weight_scale_inv" not in weights and f"{path}.scales" not in weights:
                raise QuantError(f"{key}: 8-bit (fp8?) weight without {path}.weight_scale_inv")
    return paths


def prepare_model(model: nn.Module, weights: dict[str, mx.array], config: dict) -> None:
    """Swap layers for quantized ones according to the tensors present in `weights`."""
    block = fp8_block_size(config)
    fp8_paths = _check_fp8_tensors(weights, block)
    if fp8_paths:
        seen = set()

        def swap(path: str, module: nn.Module):
            if path not in fp8_paths:
                return module
            stacked = type(module).__name__ == "SwitchLinear"  # engine.layers.moe experts
            if not (isinstance(module, nn.Linear) or stacked):
                raise QuantError(
                    f"{path}.weight_scale_inv: fp8 scales for a {type(module).__name__}"
                )
            shape = tuple(module.weight.shape)
            if tuple(weights[f"{path}.weight"].shape) != shape:
                raise QuantError(
                    f"{path}.weight: shape {tuple(weights[f'{path}.weight'].shape)}, "
                    f"the model expects {shape}"
                )
            seen.add(path)
            if stacked:
                e, out_dims, in_dims = shape
                return Fp8SwitchLinear(in_dims, out_dims, e, bias="bias" in module, block=block)
            return Fp8Linear(shape[1], shape[0], bias="bias" in module, block=block)

        leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
        model.update_modules(leaves)
        missing = sorted(fp8_paths - seen)
        if missing:
            raise QuantError(
                f"{missing[0]}.weight_scale_inv: no linear layer {missing[0]} in the model"
            )
    if any(k.endswith(".scales") for k in weights):

        def predicate(path: str, module: nn.Module):
            if f"{path}.scales" not in weights:
                return False
            return _affine_params(path, module, weights, config)

        nn.quantize(model, class_predicate=predicate)

"""LoRA adapters on a model's linear layers: apply, save, load, swap, fuse and export.

`LoRALinear` wraps a frozen base layer — `nn.Linear`, `nn.QuantizedLinear` (QLoRA: the base stays
in its quantized format, only the fp32 adapters train) or any quantized linear that can
`dequantize()` its weight — and adds `scale · dropout(x) · A · B` with A (in, r), B (r, out),
B initialised to zero so a fresh adapter changes nothing. scale = alpha / rank.

On disk an adapter is mlx-lm's layout, so either program loads the other's: `adapter_config.json`
(`fine_tune_type`, `num_layers`, `lora_parameters` {rank, scale, dropout, keys}) and
`adapters.safetensors` with keys like `model.layers.3.self_attn.q_proj.lora_a`. `keys` are paths
inside a decoder layer; the last `num_layers` decoder layers are adapted.

This module does not train (engine/train/trainer.py) and does not read checkpoints of base
models (engine/loading.py); it only rewires and serialises the modules it is given.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from engine.errors import ModelLoadError, TrainingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"

# Linear layers inside a decoder layer, by group. MLA projections are attention; router gates
# (`mlp.gate`) are never adapted: a low-rank change to routing destabilises MoE training.
ATTENTION_KEYS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "c_attn",
    "out_proj",
)
MLP_KEYS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "c_fc", "c_proj", "fc1", "fc2")
TARGET_PRESETS = {
    "attention": ATTENTION_KEYS,
    "mlp": MLP_KEYS,
    "all": ATTENTION_KEYS + MLP_KEYS,
    "qv": ("q_proj", "v_proj", "q_b_proj", "kv_b_proj"),
}
_NEVER = ("gate", "router", "shared_expert_gate", "lm_head", "embed_tokens")


# --------------------------------------------------------------------------------------------
# The layer


def _optimised_blas_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return False
    return any(name in maps for name in ("libopenblas", "libmkl", "libblis"))


_FORCED: list[bool | None] = [None]


def set_dequantize_for_matmul(value: bool | None) -> None:
    """Override the choice below (None: back to automatic); the trainer sets it per run."""
    _FORCED[0] = value


def dequantize_for_matmul() -> bool:
    """See `_auto_dequantize`; a per-run override wins (TrainConfig.dequantize_base)."""
    return _auto_dequantize() if _FORCED[0] is None else _FORCED[0]


@lru_cache(maxsize=1)
def _auto_dequantize() -> bool:
    """Whether a quantized base is dequantized to run its matmul (vs `quantized_matmul`).

    On the CPU with an optimised BLAS, dequantize + fp32 GEMM is ~10x faster than MLX's CPU
    quantized matmul for training-sized inputs; on a GPU the fused quantized kernel wins. Fixed per
    process (and overridable by LATENT_QLORA_DEQUANT=0/1) so runs stay bit-reproducible.
    """
    forced = os.environ.get("LATENT_QLORA_DEQUANT")
    if forced in ("0", "1"):
        return forced == "1"
    return mx.default_device() == mx.cpu and _optimised_blas_loaded()


def _is_affine_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, nn.QuantizedLinear)


def dequantized_weight(layer: nn.Module) -> mx.array:
    """The (out, in) weight of a linear layer of any supported kind, as floats."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    if isinstance(layer, nn.Linear):
        return layer.weight
    if hasattr(layer, "dequantized"):  # engine.quant.fp8.Fp8Linear
        return layer.dequantized(mx.float32)
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    raise TrainingError(f"cannot read the weight of a {type(layer).__name__} layer")


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a linear layer of any supported kind."""
    if isinstance(layer, nn.QuantizedLinear):
        out, packed = layer.weight.shape
        return packed * 32 // layer.bits, out
    if isinstance(layer, nn.Linear):
        out, inp = layer.weight.shape
        return inp, out
    for a, b in (("input_dims", "output_dims"), ("in_features", "out_features")):
        if hasattr(layer, a) and hasattr(layer, b):
            return int(getattr(layer, a)), int(getattr(layer, b))
    if "weight_scale_inv" in layer:  # fp8: one uint8 code per weight, (out, in)
        out, inp = layer.weight.shape
        return inp, out
    out, inp = dequantized_weight(layer).shape
    return inp, out


def is_linear(layer: Any) -> bool:
    if isinstance(layer, LoRALinear):
        return False
    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        return True
    # other quantized linears (e.g. fp8 with block scales) that can hand out their weight
    return (
        isinstance(layer, nn.Module)
        and "weight" in layer
        and layer["weight"].ndim == 2
        and (hasattr(layer, "dequantize") or hasattr(layer, "dequantized"))
        and not isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding))
    )


class LoRALinear(nn.Module):
    """y = base(x) + scale · (dropout(x) @ lora_a) @ lora_b, with the base frozen."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise TrainingError(f"LoRA rank must be ≥ 1, got {rank}")
        in_dims, out_dims = linear_dims(base)
        self.linear = base
        self.linear.freeze()
        self.scale = float(scale)
        self.rank = int(rank)
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), dtype=mx.float32)
        self.lora_b = mx.zeros((rank, out_dims), dtype=mx.float32)

    def base_forward(self, x: mx.array) -> mx.array:
        base = self.linear
        rows = x.size // max(1, x.shape[-1])
        if (_is_affine_quantized(base) or not isinstance(base, nn.Linear)) and (
            rows >= 16 and dequantize_for_matmul()
        ):
            w = mx.stop_gradient(dequantized_weight(base)).astype(x.dtype)
            y = x @ w.T
            return y + base.bias if "bias" in base else y
        return base(x)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_forward(x)
        z = (self.dropout(x).astype(mx.float32) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def dequantized(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The effective (out, in) weight, base + adapter: for code that reads a layer's weight
        instead of calling it (MLA's absorbed decode reads kv_b_proj this way)."""
        w = dequantized_weight(self.linear)
        out = w.astype(mx.float32) + self.delta()
        return out.astype(dtype or (w.dtype if w.dtype != mx.float32 else mx.float32))

    def delta(self) -> mx.array:
        """The (out, in) weight change this adapter makes: scale · (A·B)ᵀ."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fused(self, dequantize: bool = False) -> nn.Module:
        """A plain layer equal to base + adapter; re-quantized like the base unless `dequantize`."""
        base = self.linear
        w = dequantized_weight(base)
        new_w = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        in_dims, out_dims = new_w.shape[1], new_w.shape[0]
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = new_w
        if has_bias:
            fused.bias = base.bias
        if _is_affine_quantized(base) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(
                fused, base.group_size, base.bits, mode=base.mode
            )
        elif "weight_scale_inv" in base and not dequantize:  # fp8 with block scales: re-quantize
            from engine.quant.fp8 import quantize_fp8_blocks

            requant = type(base)(in_dims, out_dims, bias=has_bias, block=base.block)
            requant.weight, requant.weight_scale_inv = quantize_fp8_blocks(new_w, base.block)
            if has_bias:
                requant.bias = base.bias
            fused = requant
        return fused


def _is_switch(layer: Any) -> bool:
    """Stacked experts (engine.layers.moe.SwitchLinear and its quantized/fp8 variants)."""
    return (
        isinstance(layer, nn.Module)
        and "weight" in layer
        and layer["weight"].ndim == 3
        and (hasattr(type(layer), "num_experts"))
    )


def _switch_weight(layer: nn.Module) -> mx.array:
    """(E, out, in) float weight of a stacked-experts layer."""
    if "scales" in layer:
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    if hasattr(layer, "dequantized"):
        return layer.dequantized(mx.float32)
    return layer.weight


class LoRASwitchLinear(nn.Module):
    """LoRA on stacked experts: each expert e gets its own A[e] (r, in) and B[e] (out, r)
    (mlx-lm's shapes), applied with the same routing indices as the base."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__()
        e, out_dims = base.weight.shape[:2]
        in_dims = _switch_weight(base).shape[-1] if "scales" in base else base.weight.shape[-1]
        self.linear = base
        self.linear.freeze()
        self.scale = float(scale)
        self.rank = int(rank)
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (e, rank, in_dims), dtype=mx.float32)
        self.lora_b = mx.zeros((e, out_dims, rank), dtype=mx.float32)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(
            self.dropout(x).astype(mx.float32),
            self.lora_a.swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )
        z = mx.gather_mm(
            z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        return self.scale * (self.lora_b @ self.lora_a)  # (E, out, in)

    def fused(self, dequantize: bool = False) -> nn.Module:
        from engine.layers.moe import QuantizedSwitchLinear, SwitchLinear

        base = self.linear
        w = _switch_weight(base)
        e, out_dims, in_dims = w.shape
        fused = SwitchLinear(in_dims, out_dims, e, bias="bias" in base)
        fused.weight = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if "scales" in base and not dequantize:
            fused = QuantizedSwitchLinear.from_switch_linear(
                fused, base.group_size, base.bits, base.mode
            )
        return fused  # an fp8 expert stack fuses to float experts (no fp8 switch re-quantizer)


# --------------------------------------------------------------------------------------------
# Applying and removing


def _resolve_targets(targets: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if targets is None:
        return TARGET_PRESETS["all"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        out.extend(TARGET_PRESETS.get(t, (t,)))
    return tuple(out)


def _matches(path: str, targets: tuple[str, ...]) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in _NEVER:
        return False
    # a target is a full path inside the layer ("self_attn.q_proj") or a leaf name ("q_proj");
    # experts are lists of MLPs, so "mlp.experts.3.up_proj" matches "up_proj" too.
    return path in targets or leaf in targets


def _decoder_layers(model: nn.Module) -> list:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TrainingError(f"{type(model).__name__} has no decoder layers to adapt")
    return list(layers)


def _check_num_layers(model: nn.Module, num_layers: int | None) -> int:
    n = len(_decoder_layers(model))
    if num_layers is None or num_layers < 0:
        return n
    if num_layers > n:
        raise TrainingError(f"num_layers {num_layers} is more than the model's {n} layers")
    return num_layers


def apply_lora(
    model: nn.Module,
    targets: str | list[str] | tuple[str, ...] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    num_layers: int | None = None,
) -> list[str]:
    """Wrap the chosen linear layers of the last `num_layers` decoder layers (all if None).

    `targets`: preset names ("attention", "mlp", "all", "qv"), leaf names ("q_proj") or paths
    inside a layer ("self_attn.q_proj"). Returns the in-layer paths adapted (mlx-lm's `keys`).
    Freezes everything except the new adapters.
    """
    if lora_layers(model):
        raise TrainingError("the model already has an adapter; remove_adapter() first")
    wanted = _resolve_targets(targets)
    n = _check_num_layers(model, num_layers)
    layers = _decoder_layers(model)
    keys: set[str] = set()
    model.freeze()
    for layer in layers[len(layers) - n :]:
        swaps = [
            (
                path,
                (LoRASwitchLinear if _is_switch(m) else LoRALinear)(m, rank, alpha / rank, dropout),
            )
            for path, m in layer.named_modules()
            if (is_linear(m) or _is_switch(m)) and _matches(path, wanted)
        ]
        if swaps:
            layer.update_modules(tree_unflatten(swaps))
            keys.update(p for p, _ in swaps)
    if not keys:
        raise TrainingError(f"no linear layers match the LoRA targets {', '.join(wanted)}")
    mx.eval(model.parameters())
    return sorted(keys)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (p, m) for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))
    ]


def remove_adapter(model: nn.Module) -> int:
    """Put every base layer back (the adapter is dropped, the base untouched). Returns how many."""
    swaps = [(p, m.linear) for p, m in lora_layers(model)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def fuse(model: nn.Module, dequantize: bool = False) -> int:
    """Fold every adapter into its base layer (re-quantized like the base unless `dequantize`)."""
    swaps = [(p, m.fused(dequantize)) for p, m in lora_layers(model)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())
    return len(swaps)


def prepare_full(model: nn.Module, num_layers: int | None = None) -> list[str]:
    """Full fine-tuning: unfreeze every float parameter of the last `num_layers` decoder layers."""
    n = _check_num_layers(model, num_layers)
    layers = _decoder_layers(model)
    model.freeze()
    for layer in layers[len(layers) - n :]:
        if any(isinstance(m, nn.Module) and "scales" in m for _, m in layer.named_modules()):
            raise TrainingError(
                "full fine-tuning needs an unquantized model; use LoRA (QLoRA) instead"
            )
        layer.unfreeze()
    return [f"layers.{i}" for i in range(len(layers) - n, len(layers))]


# --------------------------------------------------------------------------------------------
# Saving and loading


def adapter_weights(model: nn.Module, fine_tune_type: str = "lora") -> dict[str, mx.array]:
    """The tensors an adapter file holds: every lora_a/lora_b, or the trainable weights (full)."""
    if fine_tune_type == "full":
        return dict(tree_flatten(model.trainable_parameters()))
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }


def adapter_config(
    model: nn.Module,
    keys: list[str],
    num_layers: int,
    rank: int,
    alpha: float,
    dropout: float,
    fine_tune_type: str = "lora",
    **extra: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {"fine_tune_type": fine_tune_type, "num_layers": num_layers}
    if fine_tune_type == "lora":
        cfg["lora_parameters"] = {
            "rank": rank,
            "scale": alpha / rank,
            "dropout": dropout,
            "keys": list(keys),
        }
    else:
        cfg["lora_parameters"] = None
    cfg.update(extra)
    return cfg


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors_atomic(
    path: Path, arrays: dict[str, mx.array], metadata: dict | None = None
) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write `adapters.safetensors` and `adapter_config.json` into `out_dir` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, config.get("fine_tune_type", "lora"))
    if not weights:
        raise TrainingError("the model has no adapter weights to save")
    save_safetensors_atomic(out / ADAPTER_WEIGHTS, weights)
    _atomic_write_bytes(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    return out


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise ModelLoadError(f"{folder}: no {ADAPTER_CONFIG} (not an adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file}: expected a JSON object")
    return cfg


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Apply the adapter saved in folder `path` (ours or mlx-lm's) to `model`, replacing any
    adapter it has. Returns the adapter's config. Mismatched tensors → ModelLoadError."""
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    cfg = read_adapter_config(folder)
    kind = cfg.get("fine_tune_type", "lora")
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise ModelLoadError(f"{folder}: no {ADAPTER_WEIGHTS}")
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:
        raise ModelLoadError(f"{weights_file}: unreadable safetensors ({e})") from None
    remove_adapter(model)
    if kind == "lora":
        lp = cfg.get("lora_parameters") or {}
        try:
            rank, scale = int(lp["rank"]), float(lp["scale"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(
                f"{folder / ADAPTER_CONFIG}: lora_parameters needs rank and scale"
            ) from None
        keys = lp.get("keys")
        try:
            apply_lora(
                model,
                targets=keys,
                rank=rank,
                alpha=scale * rank,
                dropout=float(lp.get("dropout", 0.0)),
                num_layers=cfg.get("num_layers"),
            )
        except TrainingError as e:
            raise ModelLoadError(f"{folder}: {e}") from None
        allowed = adapter_weights(model, "lora")
    elif kind == "full":
        allowed = dict(tree_flatten(model.parameters()))
    else:
        raise ModelLoadError(f"{folder}: fine_tune_type {kind!r} is not supported (lora, full)")
    for name, w in weights.items():
        if name not in allowed:
            remove_adapter(model)
            raise ModelLoadError(f"{weights_file}: tensor {name} has no place in this model")
        if tuple(w.shape) != tuple(allowed[name].shape):
            remove_adapter(model)
            raise ModelLoadError(
                f"{weights_file}: {name} has shape {tuple(w.shape)}, the model "
                f"expects {tuple(allowed[name].shape)} (adapter for another model?)"
            )
    if kind == "lora":
        missing = sorted(set(allowed) - set(weights))
        if missing:
            remove_adapter(model)
            raise ModelLoadError(
                f"{weights_file}: missing {len(missing)} adapter tensors, e.g. {missing[0]}"
            )
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return cfg


# --------------------------------------------------------------------------------------------
# Export


def export(
    model: nn.Module,
    tokenizer_src: Any,
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
    dequantize: bool = False,
) -> Path:
    """Write a standalone model folder: adapters fused, `config.json`, `model.safetensors`,
    tokenizer files. `tokenizer_src` is an HF folder, a .gguf file or a loaded Tokenizer.
    The model's own adapters are fused in place (see engine/train/export.py)."""
    from engine.train.export import export_model

    fuse(model, dequantize=dequantize)
    return export_model(model, tokenizer_src, out_dir, config)

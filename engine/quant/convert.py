"""Convert a loaded model to fp8 / q8 / q4 and write a folder `engine.load` reads back.

`float_weights` widens whatever the model holds (GGUF blocks, affine, fp8) to float32;
`quantize_weights` applies one format; `write_folder` writes config.json (with `quantization`
or `quantization_config`), model.safetensors and the tokenizer; `perplexity` scores a text.
What is quantized: fp8 follows DeepSeek (the decoder's linear layers; embeddings, norms, router
and head stay float); q8/q4 follow MLX (every linear and embedding whose width fits the group).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from latent_kernels.affine_dequant import dequant_affine

from engine.errors import QuantError
from engine.quant.affine import quantize_affine
from engine.quant.fp8 import DEFAULT_BLOCK, Fp8Linear, Fp8SwitchLinear, quantize_fp8_blocks
from engine.quant.safetensors_fp8 import save_safetensors

FORMATS = {"fp8": None, "q8": 8, "q4": 4}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)  # fmt: skip
# a paragraph to score perplexity on when none is given (public-domain style prose)
DEFAULT_TEXT = (
    "The river ran quietly past the old mill, where the wheel had not turned for many years. "
    "In the spring the water rose and covered the lower steps, and children from the village "
    "came to watch the ducks and throw bread into the current. Nobody remembered who had built "
    "the mill, but everyone agreed that it belonged to the town, and every summer a few "
    "volunteers repainted its doors and swept the floor, as if the miller might one day return."
)


def float_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every parameter as float32, quantized layers widened, under checkpoint names."""
    out: dict[str, mx.array] = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            if "biases" in m and getattr(m, "mode", "affine") == "affine":
                w = dequant_affine(m.weight, m.scales, m.biases, m.group_size, m.bits, mx.float32)
            else:
                w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits)
            out[prefix + "weight"] = w.astype(mx.float32)
            if "bias" in m:
                out[prefix + "bias"] = m.bias.astype(mx.float32)
        elif isinstance(m, (Fp8Linear, Fp8SwitchLinear)):
            out[prefix + "weight"] = m.dequantized(mx.float32)
            if "bias" in m:
                out[prefix + "bias"] = m.bias.astype(mx.float32)
    handled = {k.rsplit(".", 1)[0] for k in out}
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        owner = k.rsplit(".", 1)[0]
        if owner in handled:
            continue
        out[k] = v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
    return out


def _linear_paths(model: nn.Module) -> dict[str, str]:
    """path → "linear" / "embedding" / "experts" for every quantizable layer."""
    kinds = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, Fp8Linear)):
            kinds[path] = "linear"
        elif isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            kinds[path] = "embedding"
        elif type(m).__name__ in ("SwitchLinear", "QuantizedSwitchLinear", "Fp8SwitchLinear"):
            kinds[path] = "experts"
    return kinds


def quantize_weights(
    model: nn.Module, weights: dict[str, mx.array], fmt: str, group_size: int = 64
) -> tuple[dict[str, mx.array], set[str], dict[str, Any]]:
    """(tensors, fp8 keys, config entries) for one format applied to float `weights`."""
    if fmt not in FORMATS:
        raise QuantError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = dict(weights)
    fp8_keys: set[str] = set()
    for path, kind in _linear_paths(model).items():
        key = f"{path}.weight"
        if key not in weights:
            continue
        w = weights[key]
        if fmt == "fp8":
            skip = kind == "embedding" or path.endswith("lm_head") or path.endswith("mlp.gate")
            if skip:
                continue
            if kind == "experts":
                pairs = [quantize_fp8_blocks(w[e]) for e in range(w.shape[0])]
                out[key] = mx.stack([p[0] for p in pairs])
                out[f"{key}_scale_inv"] = mx.stack([p[1] for p in pairs])
            else:
                out[key], out[f"{key}_scale_inv"] = quantize_fp8_blocks(w)
            fp8_keys.add(key)
        else:
            if w.shape[-1] % group_size or path.endswith("mlp.gate"):
                continue
            bits = FORMATS[fmt]
            flat = w.reshape(-1, w.shape[-1])
            q, s, b = quantize_affine(flat, group_size, bits, scale_dtype=mx.float16)
            lead = w.shape[:-1]
            out[key] = q.reshape(*lead, q.shape[-1])
            out[f"{path}.scales"] = s.reshape(*lead, s.shape[-1])
            out[f"{path}.biases"] = b.reshape(*lead, b.shape[-1])
    if fmt == "fp8":
        block = list(DEFAULT_BLOCK)
        qcfg = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                        "activation_scheme": "dynamic", "weight_block_size": block}}  # fmt: skip
    else:
        qcfg = {"quantization": {"group_size": group_size, "bits": FORMATS[fmt]}}
    mx.eval(list(out.values()))
    return out, fp8_keys, qcfg


def _write_tokenizer(tokenizer, source: Path, out: Path) -> None:
    """Copy the source's tokenizer files; a GGUF vocabulary is written as tokenizer.json."""
    folder = source if source.is_dir() else source.parent
    copied = False
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
                copied = True
    if copied or tokenizer is None:
        return
    tokenizer._backend.save(str(out / "tokenizer.json"))
    tid = tokenizer.id_to_token
    cfg = {
        "bos_token": tid(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
        "eos_token": tid(tokenizer.eos_id) if tokenizer.eos_id is not None else None,
        "unk_token": tid(tokenizer.unk_id) if tokenizer.unk_id is not None else None,
        "pad_token": tid(tokenizer.pad_id) if tokenizer.pad_id is not None else None,
        "add_bos_token": bool(tokenizer.add_bos),
        "add_eos_token": bool(tokenizer.add_eos),
    }
    if tokenizer._template_text:
        cfg["chat_template"] = tokenizer._template_text
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def write_folder(
    out: Path,
    config: dict[str, Any],
    tensors: dict[str, mx.array],
    fp8_keys: set[str],
    qcfg: dict[str, Any],
    tokenizer,
    source: Path,
) -> int:
    """Write a loadable folder; returns the bytes of model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        k: v
        for k, v in config.items()
        if k not in ("quantization", "quantization_config", "quantization_format")
    }
    cfg.update(qcfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    save_safetensors(out / "model.safetensors", tensors, fp8_keys)
    _write_tokenizer(tokenizer, source, out)
    return (out / "model.safetensors").stat().st_size


def perplexity(model: nn.Module, ids: list[int]) -> float:
    """exp(mean next-token cross-entropy) of `ids` under `model`, one forward pass."""
    if len(ids) < 2:
        raise QuantError("perplexity needs a text of at least two tokens")
    x = mx.array([ids])
    logits = model(x[:, :-1]).astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")
    return math.exp(nll.item())

"""A standalone model folder from a (fused) model: `config.json` with its quantization layout,
`model.safetensors` in MLX's format, and the tokenizer's files — copied from an HF folder, or
written from a loaded `Tokenizer` (a GGUF's embedded vocabulary) as `tokenizer.json` +
`tokenizer_config.json` (+ chat template, generation config).

Knows nothing about adapters: `engine.train.lora.export` fuses them first and calls this.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.errors import TrainingError
from engine.train.lora import _atomic_write_bytes, save_safetensors_atomic

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _model_config(model: nn.Module, config: dict[str, Any] | None) -> dict[str, Any]:
    if config is not None:
        cfg = dict(config)
    elif is_dataclass(getattr(model, "args", None)):
        cfg = {k: v for k, v in asdict(model.args).items() if v is not None}
    else:
        raise TrainingError("export needs the model's config")
    for key in ("quantization", "quantization_config", "quantization_format"):
        cfg.pop(key, None)
    quant: dict[str, Any] = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            entry = {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
            if not quant:
                quant.update(entry)
            elif any(quant[k] != v for k, v in entry.items()):
                quant[path] = entry
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    return cfg


def _write_tokenizer(tokenizer_src: Any, out: Path) -> None:
    """Copy an HF folder's tokenizer files, or write them from a loaded Tokenizer (GGUF vocab)."""
    src = Path(tokenizer_src) if isinstance(tokenizer_src, (str, os.PathLike)) else None
    if src is not None and src.is_file() and src.suffix == ".gguf":
        from engine.tokenizer import Tokenizer

        tokenizer_src, src = Tokenizer.from_path(src), None
    if src is not None:
        folder = src if src.is_dir() else src.parent
        copied = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
        if not copied:
            raise TrainingError(f"{folder}: no tokenizer files to copy")
        for name in copied:
            shutil.copyfile(folder / name, out / name)
        return
    tok = tokenizer_src
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out))
        return
    backend = getattr(tok, "_backend", None)
    if backend is None or not hasattr(backend, "save"):
        raise TrainingError(f"cannot write the files of tokenizer {tok!r}")
    backend.save(str(out / "tokenizer.json"))
    cfg = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.id_to_token(tok.unk_id),
        "pad_token": tok.id_to_token(tok.pad_id),
        "add_bos_token": bool(getattr(tok, "add_bos", False)),
        "add_eos_token": bool(getattr(tok, "add_eos", False)),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if not tok.chat_template_is_fallback:
        cfg["chat_template"] = tok.chat_template
        (out / "chat_template.jinja").write_text(tok.chat_template)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if tok.eos_ids:
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.eos_ids)}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def export_model(
    model: nn.Module, tokenizer_src: Any, out_dir: str | Path, config: dict[str, Any] | None = None
) -> Path:
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cfg = _model_config(model, config)
    weights = dict(tree_flatten(model.parameters()))
    save_safetensors_atomic(out / "model.safetensors", weights, metadata={"format": "mlx"})
    _atomic_write_bytes(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True).encode())
    _write_tokenizer(tokenizer_src, out)
    return out

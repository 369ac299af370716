"""Find a model on disk, check its files, build the architecture and load its weights.

Accepted: an HF folder (config.json + safetensors, single or sharded via
model.safetensors.index.json, including mlx-community affine-quantized folders), a single
`.gguf` file, a folder holding one `.gguf`, or a Hub repo id already present in the app's models
folder or the Hugging Face cache (never downloads). Files are checked before MLX reads them
(safetensors header offsets against the file size, GGUF tensor types and extents), and the
checkpoint's tensor names and shapes against the model, so bad input ends in one
`ModelLoadError` line and nothing half-loaded is returned.

This module knows file formats and naming; the math lives in engine/models/, quantized layers in
engine/quant/, the tokenizer in engine/tokenizer.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.config import check_gguf, gguf_config, load_hf_config, read_gguf_header
from engine.device import cast_weights, compute_dtype, dtype_name, parse_dtype
from engine.errors import LatentError, ModelLoadError
from engine.models import get_model_classes
from engine.models.base import KVCacheModel


@dataclass
class ModelInfo:
    name: str
    path: str
    model_type: str
    n_params: int
    weight_bytes: int
    context_length: int
    quantization: str | None
    adapter: str | None
    dtype: str


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    config: dict[str, Any]
    path: Path
    info: ModelInfo
    kv_bits: int | None = None


# --- locating ------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def resolve_path(path_or_repo: str | os.PathLike) -> Path:
    """A local path for a file, folder or cached repo id; ModelLoadError if there is none."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    text = str(path_or_repo)
    if _REPO_ID.match(text):
        from engine.paths import models_dir

        org, name = text.split("/")
        root = models_dir()
        for cand in (
            root / org / name,
            root / f"{org}--{name}",
            root / name,
            root / f"{name}-GGUF",
            root / org / f"{name}-GGUF",
        ):
            if cand.exists() and _has_model_files(cand):
                return cand
        snap = _hf_cache_snapshot(text)
        if snap is not None and _has_model_files(snap):
            return snap
        raise ModelLoadError(
            f"{text}: not found locally (looked in {root} and the Hugging Face cache); download it first"
        )
    raise ModelLoadError(f"{text}: no such file or folder")


def _has_model_files(folder: Path) -> bool:
    return (folder / "config.json").exists() or any(folder.glob("*.gguf"))


# --- safetensors ----------------------------------------------------------------------------

_ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "C64": 8,
}


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_safetensors(path: Path) -> list[str]:
    """Validate a safetensors header against the file; returns its tensor names."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ModelLoadError(
                    f"{path}: safetensors header claims {n} bytes, file has {size}"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header")
    data_size = size - 8 - n
    names = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if not (isinstance(shape, list) and all(map(_is_count, [*shape, begin, end]))):
            raise ModelLoadError(f"{path}: corrupt safetensors header entry for {name!r}")
        if not isinstance(dtype, str) or dtype not in _ST_SIZES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        want = math.prod(shape) * _ST_SIZES[dtype]
        if end - begin != want or begin < 0:
            raise ModelLoadError(
                f"{path}: header lies about tensor {name!r}: {dtype}{list(shape)} needs {want} "
                f"bytes, offsets give {end - begin}"
            )
        if end > data_size:
            raise ModelLoadError(
                f"{path}: file is truncated (tensor {name!r} ends at byte {end} of the data "
                f"section, which has {data_size})"
            )
        names.append(name)
    return names


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelLoadError(f"{index}: corrupt index (no weight_map)") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter")]
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise ModelLoadError(
                f"{folder}: only PyTorch pickle weights (.bin/.pt), which are never loaded; "
                "use a safetensors or GGUF copy"
            )
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    return files


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        check_safetensors(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX's own checks, one line
            raise ModelLoadError(f"{f}: cannot load ({str(e).splitlines()[0]})") from None
    return weights


# --- GGUF ----------------------------------------------------------------------------------

_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales` (None: not a weight we use)."""
    stem, _, suffix = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{suffix}"
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    return None


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (half-split RoPE -> interleaved pairs) on axis 0.

    Rows are whole output features, so packed quantized weights, scales and biases permute alike.
    """
    rows = w.shape[0]
    d = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)  # (H·D, ...)


def load_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    header = read_gguf_header(path)
    check_gguf(header, path)
    config = gguf_config(header, path)
    try:
        raw = mx.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load ({str(e).splitlines()[0]})") from None
    weights = {}
    for name, value in raw.items():
        hf = gguf_to_hf_name(name)
        if hf is not None:
            weights[hf] = value
    if config["gguf_architecture"] in ("llama", "mistral"):
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        for k in list(weights):
            m = re.search(r"self_attn\.(q_proj|k_proj)\.", k)
            if m:
                weights[k] = _unpermute_rows(weights[k], heads[m.group(1)])
    if "rope_freqs.weight" in raw:
        factors = raw["rope_freqs.weight"].astype(mx.float32).reshape(-1).tolist()
        config["rope_scaling"] = {**(config.get("rope_scaling") or {}), "freq_factors": factors}
    config["quantization_format"] = _gguf_quant_name(header)
    config["gguf_has_tokenizer"] = bool(header.metadata.get("tokenizer.ggml.tokens"))
    return weights, config


def _gguf_quant_name(header) -> str | None:
    kinds = sorted({t.type_name for t in header.tensors if t.type_name not in ("F32", "F16")})
    return "+".join(kinds) + " (GGUF)" if kinds else None


# --- building ------------------------------------------------------------------------------


def _check_weights(model: nn.Module, weights: dict[str, mx.array], where: Path) -> None:
    """Same tensor names and shapes as the model expects, else one line saying which."""
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{where}: missing tensor {missing[0]!r}{more}")
    extra = [k for k in weights if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ModelLoadError(f"{where}: unexpected tensor {extra[0]!r}{more} for this model_type")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"{where}: tensor {k!r} has shape {tuple(weights[k].shape)}, config implies {tuple(v.shape)}"
            )


def count_params(model: nn.Module) -> int:
    """Logical parameter count (packed quantized weights counted unpacked)."""
    total = 0
    for _, m in model.named_modules():
        bits = getattr(m, "bits", None)
        for name, p in m.parameters().items():
            if not isinstance(p, mx.array):
                continue
            if name in ("scales", "biases") and bits:
                continue
            total += p.size * 32 // bits if (bits and name == "weight") else p.size
    return total


def build_model(config: dict[str, Any], weights: dict[str, mx.array], where: Path, dtype: mx.Dtype):
    model_type = config.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{where}: config has no model_type")
    Model, ModelArgs = get_model_classes(model_type)
    try:
        model = Model(ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{where}: bad config for {model_type!r} ({e})") from None
    weights = model.sanitize(weights)
    from engine.quant import prepare_model

    try:
        prepare_model(model, weights, config)
    except LatentError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    _check_weights(model, weights, where)
    weights = cast_weights(weights, dtype)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def _quant_name(config: dict[str, Any]) -> str | None:
    if config.get("quantization_format"):
        return config["quantization_format"]
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and q:
        if "bits" in q:
            return f"affine {q['bits']}-bit g{q.get('group_size', 64)}"
        return str(q.get("quant_method") or q.get("mode") or "quantized")
    return None


def _folder_name(path: Path) -> str:
    """`org/name` for an HF-cache snapshot, else the folder's own name."""
    parts = path.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/")
    return path.name


def _load_tokenizer(path: Path, is_gguf: bool, config: dict[str, Any]):
    try:
        from engine.tokenizer import Tokenizer
    except ImportError:
        return None
    if is_gguf and not config.get("gguf_has_tokenizer"):
        return None
    if not is_gguf:
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
        if not any((path / n).exists() for n in names):
            return None  # weights-only folder (e.g. a test's tiny random model)
    return Tokenizer.from_path(path)


def load(
    path_or_repo: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    dtype: str | mx.Dtype | None = None,
    kv_bits: int | None = None,
) -> LoadedModel:
    """Load a model (and its tokenizer, and an optional LoRA adapter) ready for inference."""
    path = resolve_path(path_or_repo)
    gguf_file: Path | None = None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: not a model (expected a .gguf file or a model folder)")
        gguf_file = path
    elif not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        # a GGUF repo may carry a config.json beside the .gguf but no safetensors
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        elif len(ggufs) > 1:
            raise ModelLoadError(
                f"{path}: holds {len(ggufs)} .gguf files; pass one of them: "
                + ", ".join(g.name for g in ggufs)
            )
        elif not (path / "config.json").exists():
            raise ModelLoadError(f"{path}: no config.json and no .gguf file")
    cdtype = parse_dtype(dtype) or compute_dtype()
    if gguf_file is not None:
        weights, config = load_gguf(gguf_file)
        model = build_model(config, weights, gguf_file, cdtype)
        where, name = gguf_file, gguf_file.stem
    else:
        config = load_hf_config(path)
        weights = load_safetensors(_safetensors_files(path))
        model = build_model(config, weights, path, cdtype)
        where, name = path, _folder_name(path)
    del weights
    if kv_bits is not None:  # quantized (4/8) or float16 (16) cache, read by make_cache()
        if kv_bits not in (4, 8, 16):
            raise ModelLoadError(f"kv_bits={kv_bits}: expected 4, 8 or 16")
        if kv_bits == 16 and not isinstance(model, KVCacheModel):
            raise ModelLoadError(
                f"kv_bits=16: model_type {config['model_type']!r} has no plain K/V cache to store "
                "in float16 (use 8 or 4)"
            )
        if not getattr(model, "supports_kv_bits", False):
            raise ModelLoadError(
                f"kv_bits={kv_bits}: model_type {config['model_type']!r} has no quantized cache"
            )
        model.kv_bits = kv_bits
    tokenizer = _load_tokenizer(where, gguf_file is not None, config)
    adapter_str = None
    if adapter is not None:
        try:
            from engine.train.lora import load_adapter
        except ImportError:
            raise ModelLoadError(f"{adapter}: adapters are not available in this build") from None
        load_adapter(model, Path(adapter))
        adapter_str = str(adapter)
    ctx = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    params = dict(tree_flatten(model.parameters()))
    info = ModelInfo(
        name=name,
        path=str(where),
        model_type=config["model_type"],
        n_params=count_params(model),
        weight_bytes=sum(v.nbytes for v in params.values()),
        context_length=ctx,
        quantization=_quant_name(config),
        adapter=adapter_str,
        dtype=dtype_name(cdtype),
    )
    return LoadedModel(model, tokenizer, config, where, info, kv_bits)

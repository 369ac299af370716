"""Model configuration as one dict with Hugging Face `config.json` keys, from either source.

- HF folders: `config.json`, plus `generation_config.json` (EOS ids, sampling defaults).
- GGUF files: the header's key/value metadata (read here with a small parser of the GGUF
  container, which also lists every tensor's type, shape and data offset so the loader can check
  a file before handing it to MLX) mapped onto HF keys.

Every config dict gets `eos_token_ids` (sorted list, the union of all sources). This module does
not build models or touch weights.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from engine.errors import ModelLoadError

# --- HF folders -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def load_hf_config(folder: Path) -> dict[str, Any]:
    """config.json (+ generation_config.json) of an HF folder, with `eos_token_ids` filled in."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    # multimodal / wrapper configs keep the language model in `text_config`
    if "model_type" not in config and isinstance(config.get("text_config"), dict):
        config = {
            **config["text_config"],
            **{k: v for k, v in config.items() if k != "text_config"},
        }
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    config["generation_config"] = gen
    config["eos_token_ids"] = sorted(
        set(_ids(config.get("eos_token_id")) + _ids(gen.get("eos_token_id")))
    )
    return config


# --- GGUF container -------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"

# GGML tensor types: (name, block size in elements, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
# what MLX's GGUF loader turns into arrays (quantized ones as affine triples)
MLX_GGUF_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}  # BF16 arrives as fp16

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGML order (fastest axis first), as stored
    type_id: int
    offset: int  # relative to the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int
    file_size: int


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        if n > self.size - self.f.tell():  # never allocate what a lying count asks for
            raise ModelLoadError(f"{self.path}: truncated or corrupt GGUF header")
        b = self.f.read(n)
        if len(b) != n:
            raise ModelLoadError(f"{self.path}: truncated GGUF header")
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.read(size * n)))
            return [self.value(etype) for _ in range(n)]
        raise ModelLoadError(f"{self.path}: corrupt GGUF header (value type {vtype})")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        r = _Reader(f, path, size)
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelLoadError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise ModelLoadError(
                    f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dims)"
                )
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            tensors.append(GGUFTensor(name, shape, r.scalar("<I"), r.scalar("<Q")))
        align = int(metadata.get("general.alignment", 32))
        pos = f.tell()
        data_offset = (pos + align - 1) // align * align
    return GGUFHeader(metadata, tensors, data_offset, size)


def check_gguf(header: GGUFHeader, path: Path) -> None:
    """Every tensor of a type MLX can load, and inside the file."""
    for t in header.tensors:
        if t.type_id not in GGML_TYPES or t.type_name not in MLX_GGUF_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has GGUF type {t.type_name}, which is not supported "
                f"(supported: {', '.join(sorted(MLX_GGUF_TYPES))})"
            )
        end = header.data_offset + t.offset + t.nbytes
        if end > header.file_size:
            raise ModelLoadError(
                f"{path}: file is truncated (tensor {t.name!r} ends at byte {end}, "
                f"file has {header.file_size})"
            )


# GGUF architecture -> HF model_type (same math)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_config(header: GGUFHeader, path: Path) -> dict[str, Any]:
    """HF-style config dict from GGUF metadata."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    names = {t.name for t in header.tensors}
    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    if n_heads is None or hidden is None or get("block_count") is None:
        raise ModelLoadError(
            f"{path}: GGUF metadata lacks {arch}.block_count/embedding_length/attention.head_count"
        )
    n_kv = get("attention.head_count_kv", n_heads)
    # the embedding's row count is the truth; GGML lists dims fastest-first, so rows come last
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    vocab = (embd.shape[-1] if embd is not None else None) or get("vocab_size")
    vocab = vocab or len(md.get("tokenizer.ggml.tokens", [])) or None
    config: dict[str, Any] = {
        "model_type": GGUF_ARCHS[arch],
        "gguf_architecture": arch,
        "num_hidden_layers": int(get("block_count")),
        "hidden_size": int(hidden),
        "intermediate_size": int(get("feed_forward_length", 4 * hidden)),
        "num_attention_heads": int(n_heads),
        "num_key_value_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    if vocab:
        config["vocab_size"] = int(vocab)
    key_len = get("attention.key_length")
    if key_len:
        config["head_dim"] = int(key_len)
    if GGUF_ARCHS[arch] == "qwen2":
        config["o_bias"] = "blk.0.attn_output.bias" in names
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(get("rope.scaling.factor", 1.0)),
        }
        orig = get("rope.scaling.original_context_length")
        if orig:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    for hf_key, key in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
    ):
        value = md.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[hf_key] = int(value)
    config["generation_config"] = {}
    config["eos_token_ids"] = _ids(config.get("eos_token_id"))
    config["name"] = md.get("general.name")
    return config

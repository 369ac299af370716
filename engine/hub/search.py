"""Search the Hub, group a repo's files into loadable variants, estimate what fits in memory.

The estimate is what `engine.load` would allocate, computed from the stored tensors'
headers (safetensors JSON header, GGUF tensor table), fetched by small Range requests, never
the whole file: unquantized float tensors at the engine's compute dtype (fp32 on CPU, fp16
on a GPU, `engine.device`), MLX-quantized tensors (packed uint32 + scales + biases) as stored
(not 32/bits times over, the mistake a parameter count from safetensors metadata makes) with
their scales/biases at the compute dtype (as `engine.device.cast_weights` leaves them),
GGUF Q4_0/Q4_1/Q8_0 as MLX affine triples (group 32); plus the KV cache for `context` tokens from the
config (latent-sized for MLA: (kv_lora_rank + qk_rope_head_dim) per layer and token), plus a
runtime overhead. "fits" ≤ 70 % of RAM, "tight" ≤ 90 %, else "won't fit".
This module knows nothing about downloading or the local library.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import get_session, hf_raise_for_status

from engine.errors import DownloadError
from engine.hub.common import api, auth_headers, endpoint, friendly_error

FORMATS = ("gguf", "mlx", "safetensors")
SORTS = {"downloads": "downloads", "likes": "likes", "updated": "last_modified"}
AUX_PATTERNS = ("*.json", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt")
OVERHEAD_BYTES = 256 * 2**20
FIT, TIGHT = 0.70, 0.90

Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes


@dataclass
class ModelSummary:
    repo_id: str
    downloads: int = 0
    likes: int = 0
    last_modified: str | None = None
    formats: list[str] = field(default_factory=list)
    n_params: int | None = None
    pipeline_tag: str | None = None
    gated: bool = False


@dataclass
class Variant:
    name: str
    files: list[str]
    bytes: int  # download size
    format: str  # "gguf" | "mlx" | "safetensors"
    estimate_bytes: int  # weights + kv + overhead
    fit: str  # "fits" | "tight" | "won't fit"
    weight_bytes: int = 0
    kv_bytes: int = 0
    overhead_bytes: int = 0
    quantization: str | None = None
    n_params: int | None = None


# -- machine ------------------------------------------------------------------------------------
def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit_label(estimate_bytes: int, memory_bytes: int | None = None) -> str:
    mem = memory_bytes or total_memory()
    if estimate_bytes <= FIT * mem:
        return "fits"
    return "tight" if estimate_bytes <= TIGHT * mem else "won't fit"


def _compute_bytes() -> int:
    from engine.device import compute_dtype

    return int(compute_dtype().size)


# -- search -------------------------------------------------------------------------------------
def _count_str(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def _name_params(repo_id: str) -> int | None:
    m = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)([MB])(?![a-z])", repo_id.split("/")[-1], re.I)
    return int(float(m.group(1)) * (1e9 if m.group(2).upper() == "B" else 1e6)) if m else None


def _formats(info) -> list[str]:
    tags = set(info.tags or [])
    names = [s.rfilename for s in (info.siblings or [])]
    cfg = info.config or {}
    out = []
    if "gguf" in tags or any(n.endswith(".gguf") for n in names):
        out.append("gguf")
    if "mlx" in tags or "quantization" in cfg:
        out.append("mlx")
    if (
        "safetensors" in tags or any(n.endswith(".safetensors") for n in names)
    ) and "mlx" not in out:
        out.append("safetensors")
    return out


def _params(info) -> int | None:
    st = getattr(info, "safetensors", None)
    if st and st.parameters:
        bits = ((info.config or {}).get("quantization") or {}).get("bits")
        # MLX packs 32/bits weights per uint32: the Hub's count of U32 "parameters" is 1/(32/bits).
        return int(
            sum(v * (32 // bits if dt == "U32" and bits else 1) for dt, v in st.parameters.items())
        )
    gg = getattr(info, "gguf", None)
    if isinstance(gg, dict) and gg.get("total"):
        return int(gg["total"])
    return _name_params(info.id)


def search_models(
    query: str = "",
    *,
    formats: list[str] | str | None = None,
    sort: str = "downloads",
    limit: int = 50,
    min_params: int | None = None,
    max_params: int | None = None,
    task: str | None = "text-generation",
) -> list[ModelSummary]:
    """Hub models matching `query`, newest/most downloaded/most liked first."""
    if isinstance(formats, str):
        formats = [formats]
    formats = [f.lower() for f in formats or []]
    if bad := [f for f in formats if f not in FORMATS]:
        raise DownloadError(f"unknown format {bad[0]!r}; use one of {', '.join(FORMATS)}")
    if sort not in SORTS:
        raise DownloadError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    num = (
        ",".join(
            ([f"min:{_count_str(min_params)}"] if min_params else [])
            + ([f"max:{_count_str(max_params)}"] if max_params else [])
        )
        or None
    )
    try:
        items = api().list_models(
            search=query or None,
            filter=formats[0] if len(formats) == 1 else None,
            pipeline_tag=task,
            num_parameters=num,
            sort=SORTS[sort],
            limit=limit,
            expand=[
                "siblings",
                "tags",
                "downloads",
                "likes",
                "lastModified",
                "pipeline_tag",
                "safetensors",
                "gguf",
                "gated",
                "config",
            ],
        )
        items = list(items)
    except Exception as e:
        raise friendly_error(e, "search") from None
    out = []
    for info in items:
        s = ModelSummary(
            repo_id=info.id,
            downloads=info.downloads or 0,
            likes=info.likes or 0,
            last_modified=info.last_modified.isoformat() if info.last_modified else None,
            formats=_formats(info),
            n_params=_params(info),
            pipeline_tag=info.pipeline_tag,
            gated=bool(info.gated),
        )
        if formats and not set(formats) & set(s.formats):
            continue
        if s.n_params is not None and (
            (min_params and s.n_params < min_params) or (max_params and s.n_params > max_params)
        ):
            continue
        out.append(s)
    return out


# -- reading tensor headers -----------------------------------------------------------------------
def remote_reader(repo_id: str, path: str, revision: str) -> Reader:
    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint())

    def read(offset: int, length: int) -> bytes:
        headers = {**auth_headers(), "Range": f"bytes={offset}-{offset + length - 1}"}
        r = get_session().get(url, headers=headers, timeout=httpx2.Timeout(30.0))
        hf_raise_for_status(r)
        return r.content[:length] if r.status_code == 206 else r.content[offset : offset + length]

    return read


def file_reader(path: str | Path) -> Reader:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


_ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def safetensors_tensors(read: Reader) -> dict[str, tuple[str, list[int]]]:
    (n,) = struct.unpack("<Q", read(0, 8))
    header = json.loads(read(8, n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def safetensors_weight_bytes(
    tensors: dict[str, tuple[str, list[int]]], compute_bytes: int, bits: int = 4
) -> tuple[int, int]:
    """(bytes the engine holds, parameter count) for one safetensors checkpoint."""
    quant = {k[: -len(".scales")] for k in tensors if k.endswith(".scales")}
    total = params = 0
    for name, (dtype, shape) in tensors.items():
        n = _numel(shape)
        stem = name.rsplit(".", 1)[0]
        if stem in quant and dtype in ("U32", "U8", "I8"):  # MLX affine packed weight: as stored
            total += n * _ST_SIZES.get(dtype, 4)
            params += n * (32 // bits if dtype == "U32" else 1)
        elif stem in quant:  # its scales and biases: floats, cast to the compute dtype
            total += n * compute_bytes
        elif dtype in ("F32", "F16", "BF16", "F64"):
            total += n * compute_bytes
            params += n
        else:  # fp8 and integer tensors stay as stored
            total += n * _ST_SIZES.get(dtype, 4)
            params += n
    return total, params


# GGUF tensor type -> (block elements, stored bytes per block)
_GGML = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    30: (1, 2),
}
_AFFINE_BITS = {2: 4, 3: 4, 8: 8}  # Q4_0, Q4_1, Q8_0 -> MLX affine bits (group 32)


class _Buf:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.u("Q")).decode("utf-8", "replace")


_GGUF_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


def _gguf_value(b: _Buf, t: int):
    if t == 8:
        return b.string()
    if t == 9:
        et, n = b.u("I"), b.u("Q")
        vals = [_gguf_value(b, et) for _ in range(n)]
        return vals if et != 8 else len(vals)  # keep vocab lists short: only their length
    return b.u(_GGUF_SCALAR[t])


def gguf_header(read: Reader) -> tuple[dict, list[tuple[str, list[int], int]]]:
    """(metadata, [(tensor name, dims, ggml type)]) from a GGUF file's header."""
    size = 1 << 20
    while True:
        b = _Buf(read(0, size))
        try:
            if b.take(4) != b"GGUF":
                raise DownloadError("not a GGUF file (bad magic)")
            b.u("I")
            n_tensors, n_kv = b.u("Q"), b.u("Q")
            meta = {}
            for _ in range(n_kv):
                key = b.string()
                meta[key] = _gguf_value(b, b.u("I"))
            tensors = []
            for _ in range(n_tensors):
                name = b.string()
                dims = [b.u("Q") for _ in range(b.u("I"))]
                tensors.append((name, dims, b.u("I")))
                b.u("Q")
            return meta, tensors
        except EOFError:
            if len(b.data) < size or size >= 256 << 20:
                raise DownloadError("GGUF header is truncated") from None
            size *= 4


def gguf_weight_bytes(tensors, compute_bytes: int) -> tuple[int, int]:
    total = params = 0
    for _name, dims, t in tensors:
        n = _numel(dims)
        params += n
        if t in (0, 1, 30):
            total += n * compute_bytes
        elif t in _AFFINE_BITS:
            total += (
                n * _AFFINE_BITS[t] // 8 + (n // 32) * 2 * compute_bytes
            )  # packed + scale, bias
        else:
            blk, nb = _GGML.get(t, (32, 18))
            total += n // blk * nb
    return total, params


def gguf_config(meta: dict) -> dict:
    """The KV-relevant part of a GGUF's metadata in config.json terms."""
    arch = meta.get("general.architecture", "llama")
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    heads = g("attention.head_count") or 0
    cfg = {
        "model_type": arch,
        "num_hidden_layers": g("block_count"),
        "hidden_size": g("embedding_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "max_position_embeddings": g("context_length"),
    }
    if g("attention.key_length"):
        cfg["head_dim"] = g("attention.key_length")
    if g("attention.kv_lora_rank"):
        cfg["kv_lora_rank"] = g("attention.kv_lora_rank")
        cfg["qk_rope_head_dim"] = g("rope.dimension_count")
    return cfg


def kv_cache_bytes(config: dict, context: int, dtype_bytes: int) -> int:
    """KV cache bytes for `context` tokens (rounded up to the cache's 256-token steps)."""
    cfg = config.get("text_config", config)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    tokens = -(-context // 256) * 256
    if cfg.get("kv_lora_rank"):  # MLA: only the compressed latent and the shared rope key
        return (
            (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 64))
            * layers
            * tokens
            * dtype_bytes
        )
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(
        cfg.get("head_dim") or (cfg.get("hidden_size") or cfg.get("n_embd") or 0) // heads
    )
    return 2 * layers * kv_heads * head_dim * tokens * dtype_bytes


@dataclass
class Estimate:
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    n_params: int
    config: dict

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes


def estimate_memory(
    weights: list[tuple[str, Reader]],
    config: dict | None,
    context: int = 4096,
    compute_bytes: int | None = None,
) -> Estimate:
    """Bytes to load these weight files (name, reader) and run `context` tokens."""
    cb = compute_bytes or _compute_bytes()
    wb = params = 0
    cfg = dict(config or {})
    for name, read in weights:
        if name.endswith(".gguf"):
            meta, tensors = gguf_header(read)
            w, p = gguf_weight_bytes(tensors, cb)
            if not cfg.get("num_hidden_layers"):
                cfg.update({k: v for k, v in gguf_config(meta).items() if v is not None})
        else:
            bits = int((cfg.get("quantization") or {}).get("bits") or 4)
            w, p = safetensors_weight_bytes(safetensors_tensors(read), cb, bits)
        wb, params = wb + w, params + p
    kv = kv_cache_bytes(cfg, context, cb)
    return Estimate(wb, kv, OVERHEAD_BYTES + wb // 20, params, cfg)


# -- variants -----------------------------------------------------------------------------------
_QUANT_RE = re.compile(
    r"(IQ\d_[A-Z0-9_]+?|Q\d_K_[SML]|Q\d_K|Q\d_\d|BF16|F16|F32)(?=[.\-_]|$)", re.I
)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def _fetch_json(repo_id: str, path: str, revision: str) -> dict:
    try:
        r = get_session().get(
            hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint()),
            headers=auth_headers(),
            timeout=httpx2.Timeout(30.0),
        )
        hf_raise_for_status(r)
        return json.loads(r.content)
    except Exception:
        return {}


def _group_files(names: list[str]) -> list[tuple[str, str, list[str]]]:
    """[(name, format, weight files)] for each loadable variant among a repo's files."""
    groups: list[tuple[str, str, list[str]]] = []
    ggufs: dict[str, list[str]] = {}
    for n in names:
        base = PurePosixPath(n).name
        if n.endswith(".gguf") and not base.lower().startswith("mmproj"):
            key = _SPLIT_RE.sub(".gguf", n)
            ggufs.setdefault(key, []).append(n)
    for key, files in sorted(ggufs.items()):
        m = _QUANT_RE.search(PurePosixPath(key).stem.split(".")[-1]) or _QUANT_RE.search(
            PurePosixPath(key).stem
        )
        groups.append((m.group(1).upper() if m else PurePosixPath(key).stem, "gguf", sorted(files)))
    by_dir: dict[str, list[str]] = {}
    for n in names:
        if n.endswith(".safetensors"):
            by_dir.setdefault(str(PurePosixPath(n).parent), []).append(n)
    for d, files in sorted(by_dir.items()):
        main = [f for f in files if not PurePosixPath(f).name.startswith("consolidated")]
        groups.append((d, "safetensors", sorted(main or files)))
    return groups


def list_variants(
    repo_id: str, revision: str = "main", context: int = 4096, memory_bytes: int | None = None
) -> list[Variant]:
    """The repo's loadable variants with download size and a memory-fit estimate each."""
    try:
        info = api().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise friendly_error(e, repo_id) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    rev = info.sha or revision
    groups = _group_files(list(sizes))
    if not groups:
        return []
    # Each variant's headers are a few small Range requests: fetch them side by side.
    with ThreadPoolExecutor(max_workers=min(8, len(groups))) as pool:
        return list(
            pool.map(lambda g: _variant(repo_id, rev, sizes, *g, context, memory_bytes), groups)
        )


def _variant(
    repo_id: str,
    rev: str,
    sizes: dict[str, int],
    name: str,
    fmt: str,
    weights: list[str],
    context: int,
    memory_bytes: int | None,
) -> Variant:
    folder = str(PurePosixPath(weights[0]).parent)
    prefix = "" if folder == "." else folder + "/"
    aux = [
        n
        for n in sizes
        if str(PurePosixPath(n).parent) == folder
        and any(fnmatch.fnmatch(PurePosixPath(n).name, p) for p in AUX_PATTERNS)
    ]
    has_config = (prefix + "config.json") in sizes
    config = _fetch_json(repo_id, prefix + "config.json", rev) if has_config else {}
    quant = None
    if fmt == "safetensors":
        q = config.get("quantization") or config.get("quantization_config") or {}
        if config.get("quantization") and q.get("bits"):
            fmt, quant = "mlx", f"{q['bits']}bit"
            label = f"mlx-{quant}"
        else:
            dt = config.get("torch_dtype") or config.get("dtype") or "float"
            label = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dt, str(dt))
        name = label if folder in (".", label) else f"{folder} ({label})"
    else:
        quant, aux = name, []
    files = sorted(weights + aux)
    try:
        readers = [(w, remote_reader(repo_id, w, rev)) for w in weights]
        est = estimate_memory(readers, config, context)
        weight_b, kv_b, over_b, n_params = (
            est.weight_bytes,
            est.kv_bytes,
            est.overhead_bytes,
            est.n_params,
        )
    except Exception:  # header unreadable: fall back to the download size
        weight_b, n_params = sum(sizes[w] for w in weights), None
        kv_b = kv_cache_bytes(config, context, _compute_bytes()) if config else 0
        over_b = OVERHEAD_BYTES + weight_b // 20
    total = weight_b + kv_b + over_b
    return Variant(
        name=name,
        files=files,
        bytes=sum(sizes[f] for f in files),
        format=fmt,
        estimate_bytes=total,
        fit=fit_label(total, memory_bytes),
        weight_bytes=weight_b,
        kv_bytes=kv_b,
        overhead_bytes=over_b,
        quantization=quant,
        n_params=n_params,
    )

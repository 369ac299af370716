"""safetensors details MLX does not cover for fp8: reading header dtypes, writing F8_E4M3.

`mx.load` (0.32) returns an `F8_E4M3` tensor as uint8 holding the raw codes, which is what
`Fp8Linear` keeps, and refuses `F8_E5M2` ("unsupported dtype"). `fp8_header_check(path)` reads
the JSON header (no pickle anywhere) to list the e4m3 tensors and to name an e5m2 one in a
one-line `QuantError` before MLX's own message.
`save_safetensors` writes uint8 codes under the `F8_E4M3` dtype so transformers and other tools
read the folder as the fp8 checkpoint it is.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.errors import QuantError

_DTYPE_NAMES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.bool_: "BOOL",
}


def safetensors_dtypes(path: str | Path) -> dict[str, str]:
    """Tensor name → safetensors dtype string ("F8_E4M3", "BF16", ...), from the JSON header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise QuantError(f"{path}: not a readable safetensors header ({e})") from None
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def fp8_header_check(path: str | Path) -> list[str]:
    """Names of the F8_E4M3 tensors in a safetensors file; QuantError for other fp8 kinds.

    A loader may call it per shard to tell fp8 codes from genuine uint8 tensors.
    """
    names = []
    for name, dtype in safetensors_dtypes(path).items():
        if dtype == "F8_E4M3":
            names.append(name)
        elif dtype.startswith("F8"):
            raise QuantError(
                f"{Path(path).name}: tensor {name} is {dtype}; only F8_E4M3 is supported"
            )
    return names


def save_safetensors(
    path: str | Path,
    tensors: dict[str, mx.array],
    fp8_keys: set[str] | frozenset[str] = frozenset(),
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` to `path`; keys in `fp8_keys` (uint8 codes) are stored as F8_E4M3."""
    header: dict = {"__metadata__": dict(metadata or {"format": "mlx"})}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        if name in fp8_keys:
            if a.dtype != mx.uint8:
                raise QuantError(f"{name}: fp8 codes must be uint8, got {a.dtype}")
            dtype = "F8_E4M3"
        else:
            dtype = _DTYPE_NAMES.get(a.dtype)
            if dtype is None:
                raise QuantError(f"{name}: cannot write dtype {a.dtype} to safetensors")
        if a.dtype == mx.bfloat16:
            raw = np.array(a.view(mx.uint16)).tobytes()
        else:
            raw = np.ascontiguousarray(np.array(a)).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    tmp.replace(path)

"""Per-layer attention caches.

`KVCache` keeps keys and values in pre-allocated (B, H, S, D) buffers grown in steps of 256
positions, so decoding does not reallocate every token. Every cache reports `offset` (tokens
held), `nbytes` (bytes allocated), `bytes_per_token`, can `trim(n)` its newest tokens, and
exposes `state`/`meta_state` so a prompt cache can save and restore it.

Other cache kinds (the MLA `LatentCache`, quantized caches) are appended below by their owners
with the same interface. This module knows nothing about models or positions.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys/values of one attention layer: (B, H_kv, S, D_k) and (B, H_kv, S, D_v).

    `dtype` is the storage dtype (None: the keys' own). float16 under float32 compute
    (`engine.load(..., kv_bits=16)`) halves the cache's memory and the bytes one decoded token
    reads from it; our CPU attention kernels read it as stored and compute in float32.
    """

    step = 256

    def __init__(self, dtype: mx.Dtype | None = None) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.dtype = dtype

    def _allocate(self, b: int, h: int, dk: int, dv: int, dtype: mx.Dtype, needed: int) -> None:
        n_steps = (needed + self.step - 1) // self.step
        size = n_steps * self.step
        new_k = mx.zeros((b, h, size, dk), dtype)
        new_v = mx.zeros((b, h, size, dv), dtype)
        if self.keys is not None and self.offset > 0:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append L new positions (B, H, L, D); return all held keys and values."""
        n = keys.shape[2]
        end = self.offset + n
        store = self.dtype or keys.dtype
        if (
            self.keys is None
            or end > self.keys.shape[2]
            or self.keys.shape[0] != keys.shape[0]
            or self.keys.dtype != store
        ):
            b, h, _, dk = keys.shape
            self._allocate(b, h, dk, values.shape[-1], store, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def take_buffers(self, n_kv_heads: int, dk: int, dv: int) -> tuple[mx.array, mx.array]:
        """Hand over the (1, H, capacity, D) buffers (float32, or `dtype`), grown so position
        `offset` fits, for a kernel to write that position (engine/layers/fused.py);
        `put_buffers` takes the results back. The cache lets go of them meanwhile, so the write
        can happen in place."""
        k = self.keys
        store = self.dtype or mx.float32
        if (
            k is None
            or self.offset + 1 > k.shape[2]
            or k.shape[:2] != (1, n_kv_heads)
            or k.shape[3] != dk
            or k.dtype != store
        ):
            self._allocate(1, n_kv_heads, dk, dv, store, self.offset + 1)
        keys, values = self.keys, self.values
        self.keys = self.values = None
        return keys, values

    def put_buffers(self, keys: mx.array, values: mx.array) -> None:
        """Take back the buffers of `take_buffers`, now holding one more position."""
        self.keys, self.values = keys, values
        self.offset += 1

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more position costs (all batch rows), 0 until the first update."""
        if self.keys is None:
            return 0
        b, h, _, dk = self.keys.shape
        dv = self.values.shape[-1]
        return b * h * (dk + dv) * self.keys.dtype.size

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the newest n positions; returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None or self.offset == 0

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, value) -> None:
        # offset is implied by state; kept for symmetry with caches that carry more metadata
        if value:
            self.offset = int(value[0])


class QuantizedKVCache:
    """KVCache whose keys and values are stored MLX-affine quantized (4 or 8 bits, groups along
    the head dimension), in buffers grown in steps of 256 like `KVCache`.

    `update_and_fetch` returns the held keys/values dequantized to the input dtype, so attention
    code is the same as with `KVCache`; the saving is in memory held between steps.
    """

    step = 256

    def __init__(self, bits: int = 8, group_size: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.keys: tuple[mx.array, ...] | None = None  # (packed, scales, biases), each (B, H, S, ·)
        self.values: tuple[mx.array, ...] | None = None
        self.offset = 0
        self._dtype = mx.float32

    def _group(self, dim: int) -> int:
        if self.group_size is not None:
            return self.group_size
        for g in (64, 32):
            if dim % g == 0:
                return g
        raise ValueError(f"head dim {dim} is not a multiple of 32; cannot quantize the KV cache")

    def _grow(self, parts_k: list[mx.array], parts_v: list[mx.array], needed: int) -> None:
        size = (needed + self.step - 1) // self.step * self.step

        def grown(old, new):
            out = []
            for i, p in enumerate(new):
                buf = mx.zeros((*p.shape[:2], size, p.shape[3]), p.dtype)
                if old is not None and self.offset > 0:
                    buf[..., : self.offset, :] = old[i][..., : self.offset, :]
                out.append(buf)
            return tuple(out)

        self.keys, self.values = grown(self.keys, parts_k), grown(self.values, parts_v)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._dtype = keys.dtype
        gk, gv = self._group(keys.shape[-1]), self._group(values.shape[-1])
        qk = list(mx.quantize(keys, gk, self.bits))
        qv = list(mx.quantize(values, gv, self.bits))
        n = keys.shape[2]
        end = self.offset + n
        if (
            self.keys is None
            or end > self.keys[0].shape[2]
            or self.keys[0].shape[0] != keys.shape[0]
        ):
            self._grow(qk, qv, end)
        for buf, new in zip(self.keys + self.values, qk + qv):
            buf[..., self.offset : end, :] = new
        self.offset = end
        k = mx.dequantize(*(b[..., :end, :] for b in self.keys), group_size=gk, bits=self.bits)
        v = mx.dequantize(*(b[..., :end, :] for b in self.values), group_size=gv, bits=self.bits)
        return k.astype(self._dtype), v.astype(self._dtype)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(b.nbytes for b in self.keys + self.values)

    @property
    def bytes_per_token(self) -> int:
        if self.keys is None:
            return 0
        return sum(b.nbytes // b.shape[2] for b in self.keys + self.values)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None or self.offset == 0

    @property
    def state(self):
        if self.keys is None:
            return ()
        return tuple(b[..., : self.offset, :] for b in self.keys + self.values)

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = tuple(value[:3]), tuple(value[3:])
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), str(self.bits), str(self.group_size or 0))

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            self.offset, self.bits = int(value[0]), int(value[1])
            self.group_size = int(value[2]) or None


def make_kv_caches(n_layers: int, kv_bits: int | None = None) -> list:
    """One cache per layer: `KVCache` (16: storing float16), or `QuantizedKVCache` when
    `kv_bits` is 4 or 8."""
    if kv_bits == 16:
        return [KVCache(mx.float16) for _ in range(n_layers)]
    if kv_bits:
        return [QuantizedKVCache(kv_bits) for _ in range(n_layers)]
    return [KVCache() for _ in range(n_layers)]


# MLA caches live beside the attention that reads them (engine/layers/mla.py).
from engine.layers.mla import LatentCache, QuantizedLatentCache  # noqa: E402, F401

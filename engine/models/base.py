"""Pieces every model file shares: `BaseModelArgs.from_dict` (unknown keys ignored) and the
checks a `Model` does on its inputs. Holds no architecture.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


@dataclasses.dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, config: dict[str, Any]):
        """Build from a HF config dict, keeping only the fields this dataclass declares."""
        names = set(inspect.signature(cls).parameters)
        return cls(**{k: v for k, v in config.items() if k in names})


def head_dim_of(args: Any) -> int:
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads


class KVCacheModel:
    """Mixin for models with one plain (or quantized) K/V cache per layer.

    `engine.load(..., kv_bits=8|4)` sets `kv_bits`; `make_cache(kv_bits)` overrides it per call
    (0 forces full precision). Models with another cache kind (MLA) use `cache_bits` alone.
    """

    supports_kv_bits = True
    kv_bits: int | None = None

    def cache_bits(self, kv_bits: int | None) -> int | None:
        return self.kv_bits if kv_bits is None else (kv_bits or None)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """One KV cache per layer, quantized to `cache_bits(kv_bits)` bits when that is set."""
        from engine.cache import make_kv_caches

        return make_kv_caches(len(self.layers), self.cache_bits(kv_bits))

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

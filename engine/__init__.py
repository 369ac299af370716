"""Latent Studio's inference and training engine (MLX; never imports Qt).

The public API is re-exported here lazily so that importing `engine` stays cheap:
`engine.load`, `engine.Engine`, `engine.SamplingParams`, `engine.LatentError`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["load", "LoadedModel", "Engine", "SamplingParams", "Event", "LatentError"]

_LAZY = {
    "load": "engine.loading",
    "LoadedModel": "engine.loading",
    "Engine": "engine.session",
    "SamplingParams": "engine.sampling",
    "Event": "engine.generate",
    "LatentError": "engine.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

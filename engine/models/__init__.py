"""Model architectures, one file per Hugging Face `model_type`.

`get_model_classes(model_type)` imports `engine.models.<module>` and returns its
`(Model, ModelArgs)`; checkpoints whose `model_type` shares another's math map onto it here.
"""

from __future__ import annotations

import importlib

from engine.errors import ModelLoadError

# model_type -> module that implements it (same math, other name).
ALIASES = {
    "mistral": "llama",
    "smollm": "llama",
    "smollm2": "llama",
}

SUPPORTED = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gpt2",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "qwen2_moe",
    "tiny",
)


def get_model_classes(model_type: str):
    module_name = ALIASES.get(model_type, model_type)
    try:
        module = importlib.import_module(f"engine.models.{module_name}")
    except ModuleNotFoundError as e:
        if e.name == f"engine.models.{module_name}":
            raise ModelLoadError(
                f"unknown model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
            ) from None
        raise
    return module.Model, module.ModelArgs

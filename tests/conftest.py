"""Shared fixtures: an isolated data folder per test session, the default model, markers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# our top-level `kernels` package shadows the PyPI `kernels` that transformers would use in
# from_pretrained (it then raises "Kernels are not available"); turn that integration off
os.environ.setdefault("USE_HUB_KERNELS", "0")


def _hide_hub_kernels_from_transformers() -> None:
    """Our top-level `kernels` package shadows Hugging Face's `kernels` (a transformers
    dependency) when the repo root is on sys.path; transformers then fails importing names
    from ours. Tell transformers the Hub kernels are absent (they are CUDA-only anyway)."""
    try:
        import transformers.utils.import_utils as iu
    except Exception:
        return
    original = iu._is_package_available

    def patched(name: str, return_version: bool = False):
        if name == "kernels":
            return (False, "N/A") if return_version else (False, None)
        return original(name, return_version)

    iu._is_package_available = patched
    iu.is_kernels_available.cache_clear()


_hide_hub_kernels_from_transformers()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as the Makefile fetched it (GGUF Q4_1 or an HF folder)."""
    from engine.defaults import ensure_default_model

    return ensure_default_model(progress=lambda *a: None)


@pytest.fixture(scope="session")
def hf_default_gguf(default_model_path):
    """transformers' fp32 model of the default GGUF (dequantized by transformers), loaded once
    per session: the reference for real-model tests (loading it takes ~15 s)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path = default_model_path
    if path.suffix != ".gguf":
        pytest.skip("the default model here is not a GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, use_kernels=False
    )
    return model.eval()


@pytest.fixture()
def latent_home(tmp_path, monkeypatch) -> Path:
    """A private LATENT_HOME for one test (settings, chats, adapters, runs)."""
    home = tmp_path / "latent-home"
    home.mkdir()
    monkeypatch.setenv("LATENT_HOME", str(home))
    return home


def pytest_collection_modifyitems(config, items):
    import mlx.core as mx

    has_metal = mx.metal.is_available()
    try:
        has_cuda = bool(mx.cuda.is_available())
    except Exception:
        has_cuda = False
    for item in items:
        if "metal" in item.keywords and not has_metal:
            item.add_marker(pytest.mark.skip(reason="needs Apple Metal"))
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with mlx-cuda"))


def has_tool(name: str) -> bool:
    return shutil.which(name) is not None

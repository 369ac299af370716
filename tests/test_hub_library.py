"""The local library and the CLI over the test Hub.

`local_models` finds a download in the HF cache (found by the client's own `scan_cache_dir`
layout), a GGUF in the app's models folder (written by the `gguf` package, so family and
context come from a header we did not write ourselves), a folder in a user directory, and an
imported file; sizes equal the bytes on disk. `delete_model` frees exactly the repo's blob
bytes (the client then no longer finds the file) or the file's size, and only forgets
imports. The `latent` CLI's search/download/models/rm run end to end; a gated repo gives
"error: ..." with the way to get access, and a download prints the folder mlx-lm would load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hubserver import HubServer, hub_env, safetensors_bytes
from huggingface_hub import try_to_load_from_cache

from engine.errors import ModelLoadError
from engine.hub import DownloadManager, delete_model, import_model, local_models

REPO = "org/tiny-st"
CONFIG = {"model_type": "qwen2", "max_position_embeddings": 32768, "num_hidden_layers": 1}


def write_gguf(path: Path, arch: str = "llama", ctx: int = 2048) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    s = HubServer().start()
    s.cache = hub_env(monkeypatch, tmp_path, s)
    s.files = {
        "config.json": json.dumps(CONFIG).encode(),
        "model.safetensors": safetensors_bytes({"w": np.arange(5000, dtype=np.float32)}),
        "extra.gguf": b"GGUF" + b"\0" * 50,
    }
    s.add_repo(REPO, s.files, tags=["safetensors"], downloads=3)
    yield s
    s.stop()


def _by_source(models, source):
    return [m for m in models if m.source == source]


def test_library_sources_sizes_and_delete(hub, tmp_path):
    m = DownloadManager(tmp_path / "state", backoff_s=0.05)
    job = m.wait(m.enqueue(REPO, include=["*.json", "*.safetensors"]), timeout=30)
    m.close()
    assert job.status == "done", job.error

    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    write_gguf(models_dir / "mine-Q8.gguf", "qwen2", 4096)
    user = tmp_path / "user-folder" / "llama-x"
    user.mkdir(parents=True)
    (user / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": 8192})
    )
    (user / "model.safetensors").write_bytes(hub.files["model.safetensors"])
    (tmp_path / "downloads-folder").mkdir()
    elsewhere = write_gguf(tmp_path / "downloads-folder" / "imported.gguf", "gemma", 8192)
    imported = import_model(elsewhere)
    assert imported.family == "gemma" and imported.context_length == 8192

    models = local_models(extra_dirs=[tmp_path / "user-folder"])
    (cached,) = _by_source(models, "hf-cache")
    assert (cached.name, cached.format, cached.family, cached.context_length) == (
        REPO,
        "safetensors",
        "qwen2",
        32768,
    )
    assert cached.size_bytes == len(hub.files["config.json"]) + len(hub.files["model.safetensors"])
    (own,) = _by_source(models, "models-dir")
    assert (own.format, own.family, own.context_length) == ("gguf", "qwen2", 4096)
    assert own.size_bytes == (models_dir / "mine-Q8.gguf").stat().st_size
    (folder,) = _by_source(models, "folder")
    assert (folder.name, folder.family, folder.context_length) == ("llama-x", "llama", 8192)
    assert _by_source(models, "imported")[0].path == str(elsewhere.resolve())

    # Deleting the cached repo frees its blobs' bytes; the client no longer finds the file.
    freed = delete_model(REPO)
    assert freed == cached.size_bytes
    assert try_to_load_from_cache(REPO, "model.safetensors", cache_dir=hub.cache) is None
    assert delete_model(str(models_dir / "mine-Q8.gguf")) == own.size_bytes
    assert not (models_dir / "mine-Q8.gguf").exists()
    # An import is only forgotten: the user's file stays.
    assert delete_model(str(elsewhere)) == 0 and elsewhere.exists()
    left = local_models()
    assert not _by_source(left, "imported") and not _by_source(left, "hf-cache")
    with pytest.raises(ModelLoadError, match="no such model"):
        delete_model("nobody/nothing")
    with pytest.raises(ModelLoadError, match="not a model"):
        import_model(tmp_path)


def test_cli_search_download_models_rm(hub, tmp_path, capsys):
    from app.cli import main

    assert main(["search", "tiny", "--format", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert REPO in out and "safetensors" in out

    assert main(["download", REPO, "--include", "*.safetensors", "--include", "config.json"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert not (folder / "extra.gguf").exists()
    # The folder is the snapshot an HF-cache reader (mlx-lm, transformers) resolves too.
    assert Path(try_to_load_from_cache(REPO, "config.json", cache_dir=hub.cache)).parent == folder

    assert main(["models"]) == 0
    assert REPO in capsys.readouterr().out

    assert main(["rm", REPO, "-y"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not folder.exists()

    hub.add_repo("meta/gated", {"w.gguf": b"g" * 20_000}, gated=True, tokens={"hf_x"})
    assert main(["download", "meta/gated"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: meta/gated is gated: request access on the model page")
        and "HF_TOKEN" in err
    )

"""Search against the test Hub with the real client: the query, format filters (one or
several), the size range, the task, sort by downloads/likes/updated and the limit select and
order exactly the repos the server's data says they should; each result lists the formats it
has and a parameter count (MLX packed counts undone, GGUF totals, or the name's "135M").
HF_ENDPOINT is read at call time: switching it mid-process reaches another server (a mirror).
"""

from __future__ import annotations

import numpy as np
import pytest
from hubserver import HubServer, hub_env, safetensors_bytes

from engine.errors import DownloadError
from engine.hub import search_models


def _st(n: int, dtype=np.float16) -> bytes:
    return safetensors_bytes({"w": np.zeros((n,), dtype=dtype)})


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    s = HubServer().start()
    hub_env(monkeypatch, tmp_path, s)
    s.add_repo(
        "meta/llama-7B",
        {"config.json": b"{}", "model.safetensors": _st(1000)},
        tags=["safetensors"],
        downloads=900,
        likes=10,
        last_modified="2024-03-01T00:00:00.000Z",
    )
    s.add_repo(
        "mlx-community/llama-7B-4bit",
        {
            "config.json": b'{"quantization": {"bits": 4, "group_size": 64}}',
            "model.safetensors": _st(250, np.uint32),
        },
        tags=["mlx", "safetensors"],
        downloads=500,
        likes=50,
        last_modified="2024-06-01T00:00:00.000Z",
    )
    s.add_repo(
        "bartowski/llama-7B-GGUF",
        {"llama-Q4_0.gguf": b"GGUF" + b"\0" * 100},
        tags=["gguf"],
        downloads=700,
        likes=30,
        n_params=7_000_000_000,
        last_modified="2024-05-01T00:00:00.000Z",
    )
    s.add_repo(
        "HuggingFaceTB/SmolLM2-135M-GGUF",
        {"smol-Q4_1.gguf": b"GGUF" + b"\0" * 100},
        tags=["gguf"],
        downloads=100,
        likes=70,
        last_modified="2024-09-01T00:00:00.000Z",
    )
    s.add_repo(
        "google/bert-base",
        {"model.safetensors": _st(10)},
        tags=["safetensors"],
        pipeline_tag="fill-mask",
        downloads=10_000,
    )
    yield s
    s.stop()


def ids(results) -> list[str]:
    return [r.repo_id for r in results]


def test_query_sort_and_limit(hub):
    assert ids(search_models("llama")) == [
        "meta/llama-7B",
        "bartowski/llama-7B-GGUF",
        "mlx-community/llama-7B-4bit",
    ]
    assert ids(search_models("llama", sort="likes")) == [
        "mlx-community/llama-7B-4bit",
        "bartowski/llama-7B-GGUF",
        "meta/llama-7B",
    ]
    assert ids(search_models("", sort="updated", limit=2)) == [
        "HuggingFaceTB/SmolLM2-135M-GGUF",
        "mlx-community/llama-7B-4bit",
    ]
    # Task text-generation by default: the fill-mask model is left out unless asked for.
    assert "google/bert-base" not in ids(search_models(""))
    assert ids(search_models("bert", task=None)) == ["google/bert-base"]
    with pytest.raises(DownloadError, match="unknown sort"):
        search_models("x", sort="stars")


def test_format_filters_and_formats_present(hub):
    assert ids(search_models("", formats="gguf")) == [
        "bartowski/llama-7B-GGUF",
        "HuggingFaceTB/SmolLM2-135M-GGUF",
    ]
    assert ids(search_models("", formats=["mlx"])) == ["mlx-community/llama-7B-4bit"]
    assert set(ids(search_models("llama", formats=["mlx", "gguf"]))) == {
        "mlx-community/llama-7B-4bit",
        "bartowski/llama-7B-GGUF",
    }
    by_id = {r.repo_id: r for r in search_models("")}
    assert by_id["mlx-community/llama-7B-4bit"].formats == ["mlx"]
    assert by_id["meta/llama-7B"].formats == ["safetensors"]
    assert by_id["bartowski/llama-7B-GGUF"].formats == ["gguf"]
    with pytest.raises(DownloadError, match="unknown format"):
        search_models("x", formats="onnx")


def test_parameter_counts_and_size_range(hub):
    by_id = {r.repo_id: r for r in search_models("")}
    assert by_id["meta/llama-7B"].n_params == 1000  # from the safetensors header (F16 count)
    assert by_id["mlx-community/llama-7B-4bit"].n_params == 250 * 8  # 8 4-bit weights per uint32
    assert by_id["bartowski/llama-7B-GGUF"].n_params == 7_000_000_000  # the Hub's gguf total
    assert by_id["HuggingFaceTB/SmolLM2-135M-GGUF"].n_params == 135_000_000  # from the name
    assert ids(search_models("", min_params=1_000_000_000)) == ["bartowski/llama-7B-GGUF"]
    assert "bartowski/llama-7B-GGUF" not in ids(search_models("", max_params=1_000_000_000))


def test_endpoint_is_read_at_call_time(hub, monkeypatch):
    mirror = HubServer().start()
    try:
        mirror.add_repo("mirror-only/model", {"a.gguf": b"GGUF"}, tags=["gguf"])
        assert ids(search_models("")) and "mirror-only/model" not in ids(search_models(""))
        monkeypatch.setenv("HF_ENDPOINT", mirror.url)
        assert ids(search_models("")) == ["mirror-only/model"]
        assert mirror.log and all(
            r["path"] == "/api/models" for r in mirror.log if "api" in r["path"]
        )
    finally:
        mirror.stop()

"""Variants and memory-fit estimates, checked against what the engine really allocates.

A tiny llama is made by HF transformers (`save_pretrained`, bf16) and an MLX 4-bit copy of it
(mx.quantize, packed uint32 + scales + biases) is put beside it; both are served by the test
Hub. `list_variants` must find the two variants with the right files and download sizes, and
its weight estimate must equal the bytes of the parameters `engine.load` builds from the
downloaded files within 10 %, the KV estimate the bytes the caches hold after `context`
tokens, and the estimate must not count MLX packed weights 32/bits times over. transformers
loads the downloaded repo by id from the HF cache, offline (the layout is the standard one). The GGUF
header reader is checked against the `gguf` package on the default model, and its estimate
against `engine.load` of that file. Fit labels follow the RAM thresholds; MLA caches are
latent-sized ((kv_lora_rank + qk_rope_head_dim) per layer and token), equal to what the engine's
LatentCache holds for a tiny DeepSeek-V2.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hubserver import HubServer, hub_env, safetensors_bytes

from engine.hub import DownloadManager, fit_label, list_variants, total_memory
from engine.hub.search import (
    estimate_memory,
    file_reader,
    gguf_header,
    kv_cache_bytes,
)

REPO = "org/tiny-llama"
CONTEXT = 300


def _tiny_llama(folder):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _mlx_4bit(files: dict, config: dict) -> None:
    """Add an MLX 4-bit copy (group 64) of the bf16 checkpoint under mlx-4bit/."""
    weights = mx.load(str(files["_path"]))
    out = {}
    for k, v in weights.items():
        if k.endswith(".weight") and v.ndim == 2 and "norm" not in k:
            w, s, b = mx.quantize(v.astype(mx.float32), group_size=64, bits=4)
            stem = k[: -len(".weight")]
            out[k], out[stem + ".scales"], out[stem + ".biases"] = (
                w,
                s.astype(mx.bfloat16),
                b.astype(mx.bfloat16),
            )
        else:
            out[k] = v
    arrays = {
        k: np.array(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.array(v)
        for k, v in out.items()
    }
    # numpy has no bf16: store the float tensors as fp16 (what a 16-bit checkpoint holds).
    arrays = {k: a.astype(np.float16) if a.dtype == np.float32 else a for k, a in arrays.items()}
    files["mlx-4bit/model.safetensors"] = safetensors_bytes(arrays)
    files["mlx-4bit/config.json"] = json.dumps(
        {**config, "quantization": {"group_size": 64, "bits": 4}}
    ).encode()


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = _tiny_llama(folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["_path"] = folder / "model.safetensors"
    _mlx_4bit(files, config)
    files.pop("_path")
    return files, config


@pytest.fixture()
def hub(tmp_path, monkeypatch, tiny_repo):
    server = HubServer().start()
    server.cache = hub_env(monkeypatch, tmp_path, server)
    server.add_repo(REPO, tiny_repo[0], tags=["safetensors", "mlx"])
    yield server
    server.stop()


def _cache_bytes(loaded, n_tokens: int) -> int:
    cache = loaded.model.make_cache()
    loaded.model(mx.zeros((1, n_tokens), dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache)


@pytest.mark.slow
def test_variants_and_estimates_match_engine_load(hub, tmp_path):
    from engine import load

    variants = {v.format: v for v in list_variants(REPO, context=CONTEXT)}
    assert set(variants) == {"safetensors", "mlx"}
    st, q = variants["safetensors"], variants["mlx"]
    assert (st.name, q.name) == ("bf16", "mlx-4bit") and q.quantization == "4bit"
    assert st.n_params == q.n_params == 106_816  # 4-bit packing undone in the count
    assert "model.safetensors" in st.files and "config.json" in st.files
    assert all(f.startswith("mlx-4bit/") for f in q.files)
    repo = hub.repos[REPO]
    assert st.bytes == sum(len(repo.files[f]) for f in st.files)

    m = DownloadManager(tmp_path / "state", backoff_s=0.05)
    for v in (st, q):
        job = m.wait(m.enqueue(REPO, include=v.files), timeout=60)
        assert job.status == "done", job.error
        folder = job.path if v is st else f"{job.path}/mlx-4bit"
        if v is st:  # the HF cache layout is the one transformers reads, by repo id, offline
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(
                REPO, cache_dir=hub.cache, local_files_only=True
            )
            assert sum(p.numel() for p in hf.parameters()) == v.n_params
        loaded = load(folder)
        actual = loaded.info.weight_bytes
        assert abs(v.weight_bytes - actual) <= 0.10 * actual, (v.name, v.weight_bytes, actual)
        kv = _cache_bytes(loaded, CONTEXT)
        assert abs(v.kv_bytes - kv) <= 0.10 * kv, (v.name, v.kv_bytes, kv)
        assert v.estimate_bytes == v.weight_bytes + v.kv_bytes + v.overhead_bytes
        assert v.fit == fit_label(v.estimate_bytes, total_memory())
    m.close()
    # Counting MLX's packed uint32 "parameters" at fp32 would make it ~8x the real bytes; it isn't.
    assert q.weight_bytes < 0.5 * st.weight_bytes


def test_fit_labels_follow_memory_thresholds():
    mem = 16 * 2**30
    assert fit_label(int(0.5 * mem), mem) == "fits"
    assert fit_label(int(0.8 * mem), mem) == "tight"
    assert fit_label(int(1.2 * mem), mem) == "won't fit"
    import os

    assert total_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_kv_cache_bytes_gqa_and_mla_from_the_definition():
    llama = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
    }
    # K and V, 30 layers, 3 KV heads of 64 dims, 4096 tokens, fp32.
    assert kv_cache_bytes(llama, 4096, 4) == 2 * 30 * 3 * 64 * 4096 * 4
    assert kv_cache_bytes(llama, 4000, 4) == kv_cache_bytes(llama, 4096, 4)  # 256-token steps
    v3 = {
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "hidden_size": 7168,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
    }
    assert kv_cache_bytes(v3, 8192, 2) == (512 + 64) * 61 * 8192 * 2
    materialised = 61 * 128 * (128 + 64 + 128) * 8192 * 2
    assert materialised / kv_cache_bytes(v3, 8192, 2) > 70


def test_gguf_variants_one_per_quant(hub, tmp_path):
    hub.add_repo(
        "org/tiny-GGUF",
        {
            "tiny-Q4_K_M.gguf": b"GGUF" + b"\0" * 20_000,
            "tiny.Q8_0.gguf": b"x" * 30_000,
            "big-Q4_0-00001-of-00002.gguf": b"a" * 11_000,
            "big-Q4_0-00002-of-00002.gguf": b"b" * 12_000,
            "mmproj-f16.gguf": b"m" * 11_000,
            "README.md": b"hi",
        },
    )
    vs = {v.name: v for v in list_variants("org/tiny-GGUF", memory_bytes=10**12)}
    assert set(vs) == {"Q4_K_M", "Q8_0", "Q4_0"}
    assert vs["Q4_0"].files == ["big-Q4_0-00001-of-00002.gguf", "big-Q4_0-00002-of-00002.gguf"]
    assert vs["Q4_0"].bytes == 23_000 and vs["Q8_0"].bytes == 30_000
    assert all(v.format == "gguf" and v.fit == "fits" for v in vs.values())


@pytest.mark.slow
def test_gguf_header_and_estimate_on_the_default_model(default_model_path):
    from pathlib import Path

    import gguf

    from engine import load

    path = Path(default_model_path)
    if path.is_dir():
        path = next(path.glob("*.gguf"))
    meta, tensors = gguf_header(file_reader(path))
    ref = gguf.GGUFReader(str(path))
    assert [(t[0], t[2]) for t in tensors] == [(t.name, int(t.tensor_type)) for t in ref.tensors]
    assert [t[1] for t in tensors] == [[int(d) for d in t.shape] for t in ref.tensors]
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    # 16 tokens: the cache still allocates its first 256-token step, which the estimate counts.
    est = estimate_memory([(path.name, file_reader(path))], None, context=16)
    loaded = load(path)
    actual = loaded.info.weight_bytes
    assert abs(est.weight_bytes - actual) <= 0.10 * actual, (est.weight_bytes, actual)
    kv = _cache_bytes(loaded, 16)
    assert abs(est.kv_bytes - kv) <= 0.10 * kv, (est.kv_bytes, kv)


def test_mla_kv_estimate_matches_the_engines_latent_cache():
    """A tiny DeepSeek-V2 (MLA) in our engine: the latent cache it fills equals the estimate."""
    from engine.models import get_model_classes

    cfg = {
        "model_type": "deepseek_v2",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "max_position_embeddings": 512,
    }
    Model, Args = get_model_classes("deepseek_v2")
    model = Model(Args.from_dict(cfg))
    cache = model.make_cache()
    model(mx.zeros((1, 300), dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    actual = sum(c.nbytes for c in cache)
    assert kv_cache_bytes(cfg, 300, 4) == actual == (16 + 8) * 2 * 512 * 4

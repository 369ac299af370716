"""`engine.load` reads every accepted source into a model that matches an independent reference.

- The default model (SmolLM2-135M-Instruct, GGUF Q4_1/Q8_0 kept quantized) against transformers
  loading the same file with `gguf_file=` (dequantized, fp32): last-position logits within 1e-2,
  and the same greedy continuation.
- Sharded safetensors (model.safetensors.index.json) against the transformers model that wrote them.
- An mlx-community-style affine 4-bit folder against transformers running weights dequantized
  with numpy from the packed format's definition (w = scale·q + bias per group).
- Repo ids resolved offline from the models folder and from the Hugging Face cache layout.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import engine  # noqa: E402

VOCAB = 128


def _tiny_llama(tmp_path, name="tiny", **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / name
    return hf, folder


def _ids(n=12):
    return np.random.default_rng(3).integers(0, VOCAB, size=(1, n)).astype(np.int32)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.slow
def test_default_gguf_matches_transformers(default_model_path, hf_default_gguf):
    loaded = engine.load(default_model_path)
    assert loaded.info.model_type == "llama"
    assert loaded.info.quantization and "Q4_1" in loaded.info.quantization
    assert loaded.config["num_hidden_layers"] == 30 and loaded.config["rope_theta"] == 100000.0
    hf = hf_default_gguf
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = np.array([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    ref = _hf_logits(hf, ids)
    ours = np.array(loaded.model(mx.array(ids)))
    assert np.abs(ours[0, -1] - ref[0, -1]).max() <= 1e-2

    # same greedy continuation for 8 tokens (ours through the KV cache)
    seq = ids[0].tolist()
    for _ in range(8):
        seq.append(int(_hf_logits(hf, np.array([seq]))[0, -1].argmax()))
    ref_gen = seq[ids.shape[1] :]
    cache = loaded.model.make_cache()
    logits = loaded.model(mx.array(ids), cache=cache)
    out = []
    for _ in range(8):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = loaded.model(mx.array([[tok]]), cache=cache)
    assert out == ref_gen


def test_gguf_folder_and_info(default_model_path):
    folder = default_model_path if default_model_path.is_dir() else default_model_path.parent
    loaded = engine.load(folder)
    info = loaded.info
    assert info.n_params > 130_000_000 and info.n_params < 140_000_000
    assert info.weight_bytes < 130_000_000  # kept quantized (fp32 would be ~540 MB)
    assert info.context_length == 8192 and info.dtype == "float32"
    assert loaded.config["eos_token_ids"] == [2]


def test_sharded_safetensors(tmp_path):
    hf, folder = _tiny_llama(tmp_path)
    hf.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    ids = _ids()
    out = np.array(engine.load(folder, dtype="float32").model(mx.array(ids)))
    assert np.abs(out - _hf_logits(hf, ids)).max() <= 1e-4


def _dequant_affine_np(
    w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int
) -> np.ndarray:
    """MLX affine layout: values packed little-end-first into uint32 words, per-group scale/bias."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    q = ((w.astype(np.uint32)[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    group = q.shape[1] // scales.shape[1]
    q = q.reshape(q.shape[0], -1, group).astype(np.float64)
    return (q * scales[..., None] + biases[..., None]).reshape(w.shape[0], -1)


def test_mlx_affine_quantized_folder(tmp_path):
    hf, folder = _tiny_llama(tmp_path)
    hf.save_pretrained(folder)
    loaded = engine.load(folder, dtype="float32")
    nn.quantize(loaded.model, group_size=32, bits=4)
    qfolder = tmp_path / "tiny-4bit"
    qfolder.mkdir()
    params = dict(tree_flatten(loaded.model.parameters()))
    mx.save_safetensors(str(qfolder / "model.safetensors"), params)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (qfolder / "config.json").write_text(json.dumps(cfg))

    qloaded = engine.load(qfolder, dtype="float32")
    assert qloaded.info.quantization == "affine 4-bit g32"
    assert isinstance(qloaded.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)

    # reference: transformers with the same weights dequantized in numpy
    state = {}
    for k in hf.state_dict():
        if f"{k[: -len('.weight')]}.scales" in params:
            base = k[: -len(".weight")]
            state[k] = torch.tensor(
                _dequant_affine_np(
                    np.array(params[k]),
                    np.array(params[f"{base}.scales"]).astype(np.float64),
                    np.array(params[f"{base}.biases"]).astype(np.float64),
                    4,
                ),
                dtype=torch.float32,
            )
        else:
            state[k] = torch.tensor(np.array(params[k]))
    hf.load_state_dict(state)
    ids = _ids()
    out = np.array(qloaded.model(mx.array(ids)))
    assert np.abs(out - _hf_logits(hf, ids)).max() <= 1e-4


def test_repo_id_from_models_dir_and_hf_cache(tmp_path, monkeypatch):
    hf, folder = _tiny_llama(tmp_path)
    hf.save_pretrained(folder)
    models = tmp_path / "models"
    shutil.copytree(folder, models / "acme" / "tiny-llama")
    monkeypatch.setenv("LATENT_MODELS_DIR", str(models))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert engine.load("acme/tiny-llama").path == models / "acme" / "tiny-llama"

    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    snap = cache / "models--other--tiny" / "snapshots" / commit
    shutil.copytree(folder, snap)
    (cache / "models--other--tiny" / "refs").mkdir()
    (cache / "models--other--tiny" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    loaded = engine.load("other/tiny")
    assert loaded.path.resolve() == snap.resolve()
    assert loaded.info.name == "other/tiny"


# --- GGUF written from tiny HF models the way llama.cpp's converter does it ------------------

_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute: rows (H, 2, D/2) -> (H, D/2, 2)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(hf, arch: str, path) -> None:
    gguf = pytest.importorskip("gguf")
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if getattr(c, "head_dim", None):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["t", "0", "t0"] + [f"x{i}" for i in range(c.vocab_size - 3)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges(["t 0"])
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for k, v in hf.state_dict().items():
        v = v.numpy().astype(np.float32)
        if k in top:
            name = top[k]
        else:
            parts = k.split(".")
            mod = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{_GGUF_BLOCK[mod]}.{parts[-1]}"
            if arch == "llama" and mod == "self_attn.q_proj":
                v = _llamacpp_permute(v, c.num_attention_heads)
            if arch == "llama" and mod == "self_attn.k_proj":
                v = _llamacpp_permute(v, c.num_key_value_heads)
        w.add_tensor(name, v)
    rp = c.rope_parameters
    if rp.get("rope_type") == "llama3":
        # convert_hf_to_gguf.py LlamaModel: llama3 scaling travels as per-pair divisors
        dim = c.hidden_size // c.num_attention_heads
        inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2) / dim))
        old = rp["original_max_position_embeddings"]
        lo, hi, f = rp["low_freq_factor"], rp["high_freq_factor"], rp["factor"]
        factors = []
        for freq in inv:
            wavelen = 2 * np.pi / freq
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(f)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / f + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_gguf_families_match_transformers(tmp_path, arch):
    """llama (Q/K rows permuted by the converter), llama 3 RoPE (as `rope_freqs.weight`),
    qwen2 (q/k/v bias), qwen3 (q/k norm, head_dim)."""
    llama3 = {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500.0,
        }
    }
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, llama3),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
    }
    cfg_cls, cls, extra = classes[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **extra,
    )
    cfg._attn_implementation = "eager"
    hf = cls(cfg).eval()
    gguf_arch = "llama" if arch == "llama3-rope" else arch
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(hf, gguf_arch, path)
    if arch in ("qwen3", "llama3-rope"):
        # transformers' GGUF reader ignores qwen3's key_length and rope_freqs: compare to the source
        ref_model = hf
    else:
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32, use_kernels=False
        ).eval()
    ids = _ids()
    loaded = engine.load(path)
    assert loaded.config["model_type"] == gguf_arch
    out = np.array(loaded.model(mx.array(ids)))
    assert np.abs(out - _hf_logits(ref_model, ids)).max() <= 1e-4


def test_generation_config_eos_and_dtype_policy(tmp_path):
    """EOS ids are the union of config.json and generation_config.json; `dtype` casts only
    unquantized weights (packed quantized weights stay uint32)."""
    hf, folder = _tiny_llama(tmp_path, eos_token_id=2)
    hf.save_pretrained(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [7, 2], "temperature": 0.3})
    )
    loaded = engine.load(folder, dtype="float16")
    assert loaded.config["eos_token_ids"] == [2, 7]
    assert loaded.config["generation_config"]["temperature"] == 0.3
    assert loaded.info.dtype == "float16"
    params = dict(tree_flatten(loaded.model.parameters()))
    assert {v.dtype for v in params.values()} == {mx.float16}

    nn.quantize(loaded.model, group_size=32, bits=4)
    qfolder = tmp_path / "q"
    qfolder.mkdir()
    mx.save_safetensors(
        str(qfolder / "model.safetensors"), dict(tree_flatten(loaded.model.parameters()))
    )
    (qfolder / "config.json").write_text((folder / "config.json").read_text())
    q = dict(tree_flatten(engine.load(qfolder, dtype="float32").model.parameters()))
    assert q["model.layers.0.mlp.up_proj.weight"].dtype == mx.uint32
    assert q["model.layers.0.mlp.up_proj.scales"].dtype == mx.float32
    assert q["model.norm.weight"].dtype == mx.float32

"""Dense families (llama, mistral, qwen2, qwen3, gpt2) and RoPE variants agree with HF transformers.

One shared runner over tiny random-initialised transformers models (PyTorch fp32, eager
attention) saved with `save_pretrained` and loaded by `engine.load`. For each it proves:
- full-sequence logits match transformers to max abs diff <= 1e-4;
- step-by-step cached decoding gives the same logits as the full forward;
- chunked prefill through the cache gives the same logits as one pass;
- a batch of two gives the same logits as two single runs.
The RoPE cases (linear, llama3, dynamic NTK, YaRN, old-style `rope_scaling` keys) run on llama
with sequences long enough for the scaling to matter.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import engine  # noqa: E402
from engine.layers.attention import padding_mask  # noqa: E402

VOCAB = 128
TOL = 1e-4

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _llama(**kw):
    cfg = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, **kw}
    return transformers.LlamaConfig(**cfg), transformers.LlamaForCausalLM


CASES = {
    "llama": lambda: _llama(tie_word_embeddings=False),
    "llama-tied-mha": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True),
    "mistral-mqa-window": lambda: (
        transformers.MistralConfig(**{**BASE, "num_key_value_heads": 1, "sliding_window": 8}),
        transformers.MistralForCausalLM,
    ),
    "qwen2-tied": lambda: (
        transformers.Qwen2Config(**BASE, tie_word_embeddings=True, use_sliding_window=False),
        transformers.Qwen2ForCausalLM,
    ),
    "qwen3": lambda: (
        transformers.Qwen3Config(**BASE, head_dim=32, tie_word_embeddings=False),
        transformers.Qwen3ForCausalLM,
    ),
    "gpt2": lambda: (
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
        transformers.GPT2LMHeadModel,
    ),
    "rope-linear": lambda: _llama(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "rope-llama3": lambda: _llama(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500.0,
        }
    ),
    "rope-dynamic": lambda: _llama(
        max_position_embeddings=12,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "rope-yarn": lambda: _llama(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        }
    ),
    "rope-yarn-mscale": lambda: _llama(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
            "rope_theta": 10000.0,
        }
    ),
}

SEQ = 20


def _build(name: str, tmp_path):
    torch.manual_seed(0)
    cfg, cls = CASES[name]()
    cfg._attn_implementation = "eager"
    hf = cls(cfg).eval()
    folder = tmp_path / name
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("dense")


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_module):
    hf, folder = _build(request.param, tmp_module)
    loaded = engine.load(folder, dtype="float32")
    return request.param, hf, loaded


def _ids(b: int = 1, n: int = SEQ, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, n)).astype(np.int32)


def _ours(loaded, ids, cache=None, mask=None) -> np.ndarray:
    return np.array(loaded.model(mx.array(ids), cache=cache, mask=mask))


def test_logits_match_transformers(pair):
    name, hf, loaded = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    out = _ours(loaded, ids)
    assert out.shape == (1, SEQ, VOCAB)
    assert np.abs(out - ref).max() <= TOL, f"{name}: max diff {np.abs(out - ref).max()}"


def test_cached_decode_equals_full_forward(pair):
    name, _, loaded = pair
    if name == "rope-dynamic":
        pytest.skip("dynamic NTK re-derives frequencies from the sequence length by design")
    ids = _ids()
    full = _ours(loaded, ids)
    cache = loaded.model.make_cache()
    steps = np.concatenate([_ours(loaded, ids[:, i : i + 1], cache) for i in range(SEQ)], axis=1)
    assert cache[0].offset == SEQ
    assert np.abs(steps - full).max() <= TOL


@pytest.mark.parametrize("chunk", [3, 8])
def test_chunked_prefill_equals_one_pass(pair, chunk):
    name, _, loaded = pair
    if name == "rope-dynamic":
        pytest.skip("dynamic NTK re-derives frequencies from the sequence length by design")
    ids = _ids()
    full = _ours(loaded, ids)
    cache = loaded.model.make_cache()
    parts = [_ours(loaded, ids[:, i : i + chunk], cache) for i in range(0, SEQ, chunk)]
    assert np.abs(np.concatenate(parts, axis=1) - full).max() <= TOL


def test_batch_of_two_equals_singles(pair):
    _, _, loaded = pair
    ids = _ids(b=2)
    both = _ours(loaded, ids)
    for row in range(2):
        single = _ours(loaded, ids[row : row + 1])
        assert np.abs(both[row] - single[0]).max() <= TOL


def test_left_padded_batch_matches_single(pair):
    """Padding mask: a shorter prompt left-padded in a batch gives its single-run logits."""
    name, _, loaded = pair
    if name in ("gpt2", "rope-dynamic"):
        pytest.skip("absolute positions shift under left padding")
    ids = _ids(b=2)
    pad = 5
    attn = np.ones((2, SEQ), dtype=np.int32)
    attn[1, :pad] = 0
    ids[1, :pad] = 0
    mask = padding_mask(mx.array(attn), SEQ)
    both = _ours(loaded, ids, mask=mask)
    single = _ours(loaded, ids[1:, pad:])
    # RoPE is relative, so the shift by `pad` positions leaves scores unchanged
    assert np.abs(both[1, pad:] - single[0]).max() <= TOL


def test_old_style_rope_scaling_keys(tmp_path):
    """Top-level rope_theta + rope_scaling (pre-transformers-5 config.json) load the same."""
    hf, folder = _build("rope-yarn", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(cfg))
    ids = _ids()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    out = _ours(engine.load(folder, dtype="float32"), ids)
    assert np.abs(out - ref).max() <= TOL


def test_kv_cache_grows_in_steps():
    from engine.cache import KVCache

    c = KVCache()
    k = mx.zeros((1, 2, 1, 8))
    c.update_and_fetch(k, k)
    first = c.nbytes
    assert first == 2 * 2 * 256 * 8 * 4
    assert c.bytes_per_token == 2 * 2 * 8 * 4
    for _ in range(254):
        c.update_and_fetch(k, k)
    assert c.nbytes == first and c.offset == 255
    c.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    assert c.nbytes == 2 * first and c.offset == 258
    assert c.trim(8) == 8 and c.offset == 250
    keys, _ = c.state
    assert keys.shape == (1, 2, 250, 8)


# --- absolute / bias position encodings (layers/positional.py) --------------------------------


def test_sinusoidal_table_matches_definition():
    from engine.layers.positional import sinusoidal_table

    d, pos = 16, np.arange(5, 12)
    ref = np.zeros((len(pos), d))
    for i in range(0, d, 2):
        ref[:, i] = np.sin(pos / 10000 ** (i / d))
        ref[:, i + 1] = np.cos(pos / 10000 ** (i / d))
    out = np.array(sinusoidal_table(mx.array(pos), d))
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("n_heads", [8, 12])
def test_alibi_slopes_match_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from engine.layers.positional import alibi_slopes

    # BLOOM's bias is slope·key_position, so key position 1 reads the slope
    ref = build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)[:, 0, 1].numpy()
    assert np.abs(np.array(alibi_slopes(n_heads)) - ref).max() <= 1e-7


def test_alibi_attention_matches_numpy():
    from engine.layers.attention import scaled_dot_product_attention
    from engine.layers.positional import alibi_mask, alibi_slopes

    rng = np.random.default_rng(0)
    H, n, off, D = 4, 3, 5, 8
    q = rng.standard_normal((1, H, n, D)).astype(np.float32)
    k = rng.standard_normal((1, H, off + n, D)).astype(np.float32)
    v = rng.standard_normal((1, H, off + n, D)).astype(np.float32)
    slopes = np.array(alibi_slopes(H), dtype=np.float64)
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k) / np.sqrt(D)
    i = np.arange(off, off + n)[:, None]
    j = np.arange(off + n)[None]
    s = s - slopes[None, :, None, None] * (i - j)[None, None]
    s = np.where((j > i)[None, None], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    out = scaled_dot_product_attention(
        mx.array(q), mx.array(k), mx.array(v), D**-0.5, alibi_mask(H, n, off)
    )
    assert np.abs(np.array(out) - ref).max() <= 1e-5


# --- quantized KV cache (engine.load(kv_bits=...)) ---------------------------------------------


@pytest.mark.parametrize("bits,tol", [(8, 2e-2), (4, 2e-1)])
def test_quantized_kv_cache_decode(tmp_path, bits, tol):
    """8/4-bit KV cache: decoding stays close to the exact forward and holds far fewer bytes."""
    from engine.cache import KVCache, QuantizedKVCache

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**BASE, "hidden_size": 128, "num_attention_heads": 4})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    loaded = engine.load(tmp_path / "m", dtype="float32", kv_bits=bits)
    ids = _ids()
    full = _ours(loaded, ids)
    cache = loaded.model.make_cache()
    assert isinstance(cache[0], QuantizedKVCache)
    head = _ours(loaded, ids[:, :8], cache)
    steps = [head] + [_ours(loaded, ids[:, i : i + 1], cache) for i in range(8, SEQ)]
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= tol
    plain = loaded.model.make_cache(kv_bits=0)
    assert isinstance(plain[0], KVCache)
    _ours(loaded, ids, plain)
    ratio = cache[0].nbytes / plain[0].nbytes
    assert ratio < (0.35 if bits == 8 else 0.2), ratio  # fp32 scales+biases per 32 values
    assert cache[0].trim(4) == 4 and cache[0].offset == SEQ - 4

"""fp8 checkpoints load through `engine.load` and stay fp8: tiny DeepSeek-V3 and llama folders,
written by the test in the DeepSeek form (F8_E4M3 `weight` + float32 `weight_scale_inv`, 128x128
blocks, ragged edges, per-expert tensors), give the logits of transformers (PyTorch fp32) run on
the same weights dequantized independently in numpy, within fp16 tolerance; token-by-token
decoding (which widens only the routed experts) agrees with the full forward; and the loaded
model holds its fp8 weights at 1 byte per parameter (+ scales), measured by parameter bytes and
by MLX's allocator and process RSS deltas.
"""

from __future__ import annotations

import gc
import json

import mlx.core as mx
import numpy as np
import pytest

import engine
from engine.quant import Fp8Linear, Fp8SwitchLinear, quantize_fp8_blocks, save_safetensors

TOKENS = [[3, 17, 42, 9, 60, 1, 33, 7], [5, 5, 12, 63, 28, 40, 2, 19]]
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def _transformers():
    """transformers, imported so that our `kernels/` package does not shadow the pip one."""
    import transformers.utils as tu
    import transformers.utils.import_utils as iu

    tu.is_kernels_available = iu.is_kernels_available = lambda *a, **k: False
    import transformers

    return transformers


def e4m3_f64(codes: np.ndarray) -> np.ndarray:
    """Decode e4m3fn codes from the definition, float64 (independent of engine/kernels)."""
    c = codes.astype(np.int64)
    s, e, m = c >> 7, (c >> 3) & 15, c & 7
    v = np.where(e == 0, 2.0**-6 * m / 8, 2.0 ** (e - 7.0) * (1 + m / 8))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    return np.where(s == 1, -v, v)


def dequant_np(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    return e4m3_f64(codes) * scales[np.arange(n)[:, None] // 128, np.arange(k)[None, :] // 128]


def _randomize(model, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _is_fp8_target(name: str, shape: tuple) -> bool:
    """What DeepSeek quantizes: the decoder's projections; not embeddings, norms, router, head."""
    if not name.startswith("model.layers.") or len(shape) < 2:
        return False
    return not (name.endswith("mlp.gate.weight") or "norm" in name)


def write_fp8_folder(hf_model, folder, config: dict) -> None:
    """Write the HF model's weights in DeepSeek's fp8 form; load the dequantized values back
    into `hf_model` so it becomes the reference for exactly what the checkpoint holds."""
    import torch

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    tensors, fp8_keys, back = {}, set(), {}

    def put_fp8(key: str, w: np.ndarray) -> np.ndarray:
        codes, scales = quantize_fp8_blocks(mx.array(w))
        tensors[key] = codes
        tensors[key + "_scale_inv"] = scales
        fp8_keys.add(key)
        return dequant_np(np.array(codes), np.array(scales))

    for name, w in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers' fused experts: split
            prefix = name[: -len("gate_up_proj")]
            inter = w.shape[1] // 2
            deq = np.empty(w.shape, np.float64)
            for e in range(w.shape[0]):
                deq[e, :inter] = put_fp8(f"{prefix}{e}.gate_proj.weight", w[e, :inter])
                deq[e, inter:] = put_fp8(f"{prefix}{e}.up_proj.weight", w[e, inter:])
            back[name] = deq
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            deq = np.stack(
                [put_fp8(f"{prefix}{e}.down_proj.weight", w[e]) for e in range(w.shape[0])]
            )
            back[name] = deq
        elif _is_fp8_target(name, w.shape):
            back[name] = put_fp8(name, w)
        else:
            tensors[name] = mx.array(w)
    folder.mkdir(parents=True)
    save_safetensors(folder / "model.safetensors", tensors, fp8_keys)
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}))
    with torch.no_grad():
        state = hf_model.state_dict()
        for name, deq in back.items():
            state[name].copy_(torch.from_numpy(deq.astype(np.float32)))


def _hf_logits(hf_model, tokens=TOKENS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.double().numpy()


def _fp8_layers(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8SwitchLinear))]


@pytest.mark.slow
def test_tiny_deepseek_v3_fp8_matches_transformers(tmp_path):
    tf = _transformers()
    cfg = dict(
        vocab_size=64, hidden_size=160, intermediate_size=192, moe_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32,
        q_lora_rank=40, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1, max_position_embeddings=64, tie_word_embeddings=False,
        model_type="deepseek_v3",
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    hf = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**cfg)).eval()
    _randomize(hf)
    folder = tmp_path / "ds3-fp8"
    write_fp8_folder(hf, folder, hf.config.to_dict())
    ref = _hf_logits(hf)

    loaded = engine.load(folder, dtype="float32")
    layers = _fp8_layers(loaded.model)
    assert any(isinstance(m, Fp8SwitchLinear) for m in layers) and len(layers) >= 10
    assert all(m.weight.dtype == mx.uint8 for m in layers)
    got = np.array(loaded.model(mx.array(TOKENS)))
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)
    # one token at a time: absorbed latent attention + only the routed experts widened
    cache = loaded.model.make_cache()
    x = mx.array(TOKENS[:1])
    steps = [loaded.model(x[:, :3], cache)] + [
        loaded.model(x[:, i : i + 1], cache) for i in range(3, x.shape[1])
    ]
    stepwise = np.array(mx.concatenate(steps, axis=1))
    np.testing.assert_allclose(stepwise, got[:1], atol=1e-4 * np.abs(ref).max(), rtol=0)


def _llama_fp8(tmp_path, hidden=160, inter=320, layers=2, name="llama-fp8"):
    tf = _transformers()
    import torch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    hf = tf.LlamaForCausalLM(cfg).eval()
    _randomize(hf)
    folder = tmp_path / name
    write_fp8_folder(hf, folder, cfg.to_dict())
    return hf, folder


def test_tiny_llama_fp8_matches_transformers(tmp_path):
    hf, folder = _llama_fp8(tmp_path)
    ref = _hf_logits(hf)
    loaded = engine.load(folder, dtype="float32")
    assert len(_fp8_layers(loaded.model)) == 14
    assert loaded.info.quantization == "fp8"
    got = np.array(loaded.model(mx.array(TOKENS)))
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max(), rtol=0)


_RSS_PROBE = """
import gc, os, sys
import mlx.core as mx
import engine, engine.config, engine.loading, engine.quant, engine.models.llama, engine.tokenizer
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
r0 = rss()
loaded = engine.load(sys.argv[1], dtype="float32")
mx.eval(loaded.model.parameters())
gc.collect()
print(rss() - r0)
"""


@pytest.mark.slow
def test_fp8_model_holds_one_byte_per_param(tmp_path):
    import subprocess
    import sys

    _, folder = _llama_fp8(tmp_path, hidden=512, inter=1536, layers=4, name="llama-fp8-big")
    gc.collect()
    mx.clear_cache()
    active0 = mx.get_active_memory()
    loaded = engine.load(folder, dtype="float32")
    mx.eval(loaded.model.parameters())
    gc.collect()
    mx.clear_cache()
    resident = mx.get_active_memory() - active0
    layers = _fp8_layers(loaded.model)
    n_fp8 = sum(m.weight.size for m in layers)
    fp8_bytes = sum(m.weight.nbytes for m in layers)
    scale_bytes = sum(m.weight_scale_inv.nbytes for m in layers)
    assert fp8_bytes == n_fp8  # exactly one byte per quantized parameter
    assert scale_bytes < 0.001 * n_fp8  # float32 per 128x128 block = 4/16384 bytes/param
    other = loaded.info.weight_bytes - fp8_bytes - scale_bytes  # embeddings, head, norms: fp32
    # RSS in a fresh process, so nothing this test allocated before is reused
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(folder)], capture_output=True, text=True, check=True
    )
    rss = int(out.stdout.strip().splitlines()[-1])
    print(f"fp8 params {n_fp8:,}: weights {fp8_bytes:,} B + scales {scale_bytes:,} B + other "
          f"{other:,} B; MLX active delta {resident:,} B; RSS delta {rss:,} B")  # fmt: skip
    assert resident <= 1.10 * loaded.info.weight_bytes
    # a widened copy of the quantized layers would add 2 (bf16) or 4 (fp32) bytes/param
    assert resident - other < 1.5 * n_fp8
    assert rss < other + 1.5 * n_fp8

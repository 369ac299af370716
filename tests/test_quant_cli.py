"""`latent quantize` writes folders that `engine.load` reads back: for fp8, q8 and q4 on a tiny
llama (HF folder with a tokenizer), the reloaded weights equal an independent numpy dequantization
of the files (fp8 via the e4m3 definition, affine via unpacking), the reloaded logits stay close to
the source's, the report prints size and perplexity, and bad input is one error line.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import engine
from app.cli import main
from engine.quant.safetensors_fp8 import safetensors_dtypes


def _tiny_llama_folder(tmp_path):
    import transformers

    from engine.tokenizer import Tokenizer  # noqa: F401  (the folder needs a tokenizer)

    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "src"
    hf.save_pretrained(folder)
    from tokenizers import Tokenizer as T
    from tokenizers import models, pre_tokenizers

    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26, " ": 27}
    tok = T(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>"}))
    return folder


@pytest.mark.parametrize("fmt", ["fp8", "q8", "q4"])
def test_quantize_round_trip(tmp_path, capsys, fmt):
    src = _tiny_llama_folder(tmp_path)
    out = tmp_path / f"out-{fmt}"
    assert (
        main(["quantize", str(src), "--format", fmt, "--group-size", "32", "--out", str(out)]) == 0
    )
    report = capsys.readouterr().out
    assert "perplexity on" in report and "bytes/param" in report
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    a = engine.load(src, dtype="float32")
    b = engine.load(out, dtype="float32")
    raw = mx.load(str(out / "model.safetensors"))
    w_src = np.array(a.model.model.layers[0].mlp.up_proj.weight)
    key = "model.layers.0.mlp.up_proj"
    if fmt == "fp8":
        assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
        assert safetensors_dtypes(out / "model.safetensors")[f"{key}.weight"] == "F8_E4M3"
        c = np.array(raw[f"{key}.weight"]).astype(np.int64)
        s, e, m = c >> 7, (c >> 3) & 15, c & 7
        v = np.where(e == 0, 2.0**-6 * m / 8, 2.0 ** (e - 7.0) * (1 + m / 8)) * np.where(s, -1, 1)
        sc = np.array(raw[f"{key}.weight_scale_inv"])
        deq = v * sc[np.arange(256)[:, None] // 128, np.arange(128)[None] // 128]
        rel = 2.0**-4
    else:
        bits = 8 if fmt == "q8" else 4
        assert cfg["quantization"] == {"group_size": 32, "bits": bits}
        words = np.array(raw[f"{key}.weight"])
        q = (words[..., None] >> (np.arange(32 // bits, dtype=np.uint32) * bits)) & (
            (1 << bits) - 1
        )
        q = q.reshape(256, 128).astype(np.float64)
        sc = np.repeat(np.array(raw[f"{key}.scales"], np.float64), 32, 1)
        bi = np.repeat(np.array(raw[f"{key}.biases"], np.float64), 32, 1)
        deq = q * sc + bi
        assert np.all(np.abs(deq - w_src) <= sc / 2 + 2e-3 * np.abs(w_src).max())
        rel = 2.0 ** -(bits - 1)
    layer = b.model.model.layers[0].mlp.up_proj
    got = (
        layer.dequantized(mx.float32)
        if fmt == "fp8"
        else mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    )
    np.testing.assert_allclose(np.array(got), deq, rtol=1e-6, atol=1e-6)
    ids = mx.array([[1, 5, 9, 27, 3, 8]])
    la, lb = np.array(a.model(ids)), np.array(b.model(ids))
    assert np.abs(la - lb).max() < rel * np.abs(la).max()


def test_quantize_bad_input(tmp_path, capsys):
    src = _tiny_llama_folder(tmp_path)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["quantize", str(src), "--format", "q4", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err

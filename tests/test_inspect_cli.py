"""`latent inspect` on a small teaching-model folder (tokenizer trained here, weights random).

Proves the command's contract without the slow default model: the storage summary prints the
parts and the KV line; `--look` prints the next-token line and one attention line per layer;
`--check-math` prints the per-layer table, ends with "max abs difference: X", exits 0 within
the dtype's tolerance and 2 when a tolerance of 0 is demanded (engine and float64 reference
never agree to the last bit in float32).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from app.cli import main
from engine.models.tiny import Model, ModelArgs
from engine.train.pretrain import default_corpus, read_texts, save, train_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tiny")
    path = train_tokenizer(read_texts(default_corpus()), out, 320)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    mx.random.seed(0)
    model = Model(
        ModelArgs(
            vocab_size=sp.vocab_size(),
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            ffn="moe",
            positional="alibi",
        )
    )
    save(model, out, sp)
    return out


def test_storage_summary(folder, capsys):
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "embeddings" in out and "experts" in out and "KV cache per token" in out


def test_look(folder, capsys):
    assert main(["inspect", str(folder), "--look", "--prompt", "The mill by the river"]) == 0
    out = capsys.readouterr().out
    assert "next token:" in out
    assert sum(line.startswith("layer ") and "attention" in line for line in out.splitlines()) == 2
    assert "experts per token" in out


def test_check_math_exit_codes(folder, capsys):
    assert main(["inspect", str(folder), "--check-math"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("max abs difference: ") and any(
        x.startswith("layer 1") for x in lines
    )
    assert main(["inspect", str(folder), "--check-math", "--tolerance", "0"]) == 2

"""`latent pretrain` trains a tokenizer and the teaching model from scratch into a loadable folder.

- The SentencePiece tokenizer it trains has PAD=0, UNK=1, BOS=2, EOS=3 as the engine's
  Tokenizer reads them back, round-trips every bundled document exactly, gives UNK for an
  unseen character only when byte fallback is off, and round-trips it when it is on.
- (slow) `latent pretrain --preset test` on the bundled corpus writes a folder that
  `engine.load` opens and chats with; the model's perplexity on the held-out tail of each
  document, computed here from its logits, is below a unigram baseline's (token frequencies of
  the training part, add-one smoothed), both computed in this test with numpy.
- Bad input (unknown preset, empty folder) is a one-line TrainingError.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import engine
from engine.errors import TrainingError
from engine.tokenizer import Tokenizer
from engine.train.pretrain import (
    PretrainConfig,
    default_corpus,
    pretrain,
    read_texts,
    train_tokenizer,
)

TEXTS = read_texts(default_corpus())


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_tokenizer_ids_and_round_trip(tmp_path, byte_fallback):
    train_tokenizer(TEXTS, tmp_path, 320, byte_fallback=byte_fallback)
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("Hi", add_special_tokens=True)[0] == 2
    odd = "The cat saw жук."
    ids = tok.encode(odd, add_special_tokens=False)
    if byte_fallback:
        assert tok.unk_id not in ids and tok.decode(ids) == odd
    else:
        assert tok.unk_id in ids


def test_bad_input(tmp_path):
    with pytest.raises(TrainingError, match="preset 'huge'"):
        next(
            pretrain(
                PretrainConfig(data=str(default_corpus()), out=str(tmp_path / "o"), preset="huge")
            )
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no .txt or .md"):
        next(pretrain(PretrainConfig(data=str(tmp_path / "empty"), out=str(tmp_path / "o"))))


@pytest.mark.slow
def test_pretrain_cli_beats_unigram_and_chats(tmp_path):
    out = tmp_path / "tiny-model"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "pretrain",
            "--preset",
            "test",
            "--steps",
            "150",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "unigram baseline" in run.stdout
    loaded = engine.load(out)
    assert loaded.info.model_type == "tiny"
    tok = loaded.tokenizer
    train, held, targets_logp = [], [], []
    for text in TEXTS:
        ids = [tok.bos_id, *tok.encode(text, add_special_tokens=False), tok.eos_id]
        cut = len(ids) - max(2, len(ids) // 10)
        train.extend(ids[:cut])
        held.append(ids[cut - 32 :])  # 32 tokens of context, then the held-out tail
    counts = np.bincount(train, minlength=tok.vocab_size) + 1.0
    uni = np.log(counts / counts.sum())
    uni_logp = []
    for seq in held:
        logits = np.array(loaded.model(mx.array([seq[:-1]])).astype(mx.float32))[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        tgt = np.array(seq[1:])
        targets_logp.extend(logp[np.arange(len(tgt)), tgt][31:])
        uni_logp.extend(uni[tgt][31:])
    model_ppl, uni_ppl = np.exp(-np.mean(targets_logp)), np.exp(-np.mean(uni_logp))
    assert model_ppl < 0.8 * uni_ppl, (model_ppl, uni_ppl)

    from engine.sampling import SamplingParams
    from engine.session import Engine

    eng = Engine()
    eng.attach(loaded)
    reply = "".join(
        ev.text
        for ev in eng.chat(
            [{"role": "user", "content": "Tell me about the mill."}],
            SamplingParams(temperature=0.0, max_tokens=20),
        )
    )
    assert eng.last_stats.generated_tokens > 0 and isinstance(reply, str)

"""Our tokenizer against independent references.

- The default GGUF (SmolLM2, byte-level BPE rebuilt from GGUF metadata): encode and decode equal
  transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)` on English, code, emoji,
  Chinese, whitespace-heavy text and text with special tokens; BOS/EOS/UNK/PAD ids equal the
  file's metadata as the `gguf` package reads it.
- The streaming detokenizer: its segments concatenate to `decode(ids)` and never hold U+FFFD
  for emoji/CJK, where a naive per-token decode does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer, read_gguf_metadata

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "I love pizza 🍕🍕 and rockets 🚀! Family: 👨‍👩‍👧‍👦, flags 🇫🇷.",
    "你好，世界！今天天气很好。机器学习是人工智能的一个分支。",
    "   leading spaces\t\ttabs\n\n\n  trailing   \r\n  mixed \u00a0nbsp   ",
    "Numbers 3.14159, 2025-12-04, 1,000,000 and x^2+y^2=z^2 -- isn't it?",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, עברית, हिन्दी",
    "",
]


@pytest.fixture(scope="module")
def gguf_path(default_model_path) -> Path:
    path = Path(default_model_path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            pytest.skip("the default model is not a GGUF here")
        path = ggufs[0]
    return path


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_path(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_matches_transformers(ours, reference, text):
    expected = reference(text)["input_ids"]
    got = ours.encode(text)
    assert got == expected
    assert ours.decode(got) == reference.decode(expected)
    assert ours.decode(got, skip_special_tokens=True) == reference.decode(
        expected, skip_special_tokens=True
    )


def test_gguf_special_ids_match_metadata(ours, gguf_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    assert ours.bos_id == field("tokenizer.ggml.bos_token_id")
    assert ours.eos_ids == {field("tokenizer.ggml.eos_token_id")}
    assert ours.unk_id == field("tokenizer.ggml.unknown_token_id")
    assert ours.pad_id == field("tokenizer.ggml.padding_token_id")
    assert ours.add_bos == bool(field("tokenizer.ggml.add_bos_token"))
    assert ours.vocab_size == len(field("tokenizer.ggml.tokens"))
    # our header reader agrees with the gguf package on the whole vocabulary
    meta = read_gguf_metadata(gguf_path)
    assert meta["tokenizer.ggml.tokens"] == field("tokenizer.ggml.tokens")
    assert meta["tokenizer.ggml.merges"] == field("tokenizer.ggml.merges")


def test_gguf_metadata_from_mlx_gives_same_tokenizer(ours, gguf_path):
    import mlx.core as mx

    _, meta = mx.load(str(gguf_path), return_metadata=True)
    again = Tokenizer.from_gguf(gguf_path, metadata=meta)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
    assert (again.bos_id, again.eos_ids, again.unk_id, again.pad_id) == (
        ours.bos_id,
        ours.eos_ids,
        ours.unk_id,
        ours.pad_id,
    )


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizer_concatenates_to_decode(ours, text):
    ids = ours.encode(text)
    detok = ours.detokenizer()
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == ours.decode(ids)
    assert detok.text == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_detokenizer_holds_back_partial_utf8(ours):
    ids = ours.encode("🚀你好")
    naive = [ours.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in naive), "the text should split characters across tokens"
    detok = ours.detokenizer()
    pieces = [detok.add_token(i) for i in ids]
    assert "".join(pieces) == "🚀你好"
    assert "" in pieces  # something was held back until its bytes were complete

"""Our tokenizer against independent references.

- The default GGUF (SmolLM2, byte-level BPE rebuilt from GGUF metadata): encode and decode equal
  transformers' `AutoTokenizer.from_pretrained(folder, gguf_file=...)` on English, code, emoji,
  Chinese, whitespace-heavy text and text with special tokens; BOS/EOS/UNK/PAD ids equal the
  file's metadata as the `gguf` package reads it.
- SentencePiece models trained here (BPE and Unigram, with and without byte fallback), read as
  `tokenizer.model`: ids equal the `sentencepiece` library's on the same texts (whitespace runs,
  leading spaces, emoji, CJK); unseen characters give the UNK id without byte fallback and byte
  pieces with it; the BPE model equals transformers' `LlamaTokenizer`; the same vocabulary
  written into a GGUF (as llama.cpp stores it) tokenizes like sentencepiece; models trained with
  sentencepiece's default NFKC normalization and whitespace removal match too.
- The streaming detokenizer: its segments concatenate to `decode(ids)` and never hold U+FFFD
  for emoji/CJK, where a naive per-token decode does; SentencePiece's leading-space rule holds.
"""

from __future__ import annotations

import json
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


@pytest.mark.slow
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


# -- SentencePiece: a model trained here, read as tokenizer.model and as a GGUF ----------------

SPM_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return fib(n - 1) + fib(n - 2)\n",
    "I love pizza 🍕🍕 and rockets 🚀!",
    "你好，世界！",
    "leading words\t\ttabs\n\n  trailing   ",
    "   three leading spaces",
    " a  b   c    ",
    "",
]
UNSEEN = "你好🚀"  # characters absent from the training text


def _train_spm(folder: Path, model_type: str, byte_fallback: bool, nfkc: bool = False) -> Path:
    import io

    spm = pytest.importorskip("sentencepiece")
    corpus = [line for line in Path(__file__).read_text().splitlines() if line.strip()]
    corpus = [line for line in corpus if line.isascii()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=400,
        model_type=model_type,
        byte_fallback=byte_fallback,
        normalization_rule_name="nmt_nfkc" if nfkc else "identity",
        remove_extra_whitespaces=nfkc,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
        )
    )
    return folder


def _write_spm_gguf(model_file: Path, out: Path) -> Path:
    """The same vocabulary as llama.cpp's converter stores it (tokens, scores, types)."""
    gguf = pytest.importorskip("gguf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


SPM_KINDS = [("bpe", True), ("bpe", False), ("unigram", True), ("unigram", False)]


@pytest.fixture(scope="module", params=SPM_KINDS, ids=lambda p: f"{p[0]}-fallback={p[1]}")
def spm_folder(request, tmp_path_factory) -> tuple[Path, str, bool]:
    kind, fallback = request.param
    folder = tmp_path_factory.mktemp(f"spm-{kind}-{fallback}")
    return _train_spm(folder, kind, fallback), kind, fallback


def test_spm_model_matches_sentencepiece(spm_folder):
    import sentencepiece as spm

    folder, _, fallback = spm_folder
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = Tokenizer.from_path(folder)
    assert (ours.bos_id, ours.eos_ids, ours.unk_id) == (sp.bos_id(), {sp.eos_id()}, sp.unk_id())
    for text in SPM_TEXTS:
        expected = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert ours.encode(text) == [sp.bos_id(), *expected]  # add_bos_token: true
        if fallback or sp.unk_id() not in expected:  # sentencepiece spells UNK " ⁇ "
            assert ours.decode(expected) == sp.decode(expected)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_spm_nfkc_normalization_matches_sentencepiece(kind, tmp_path):
    """sentencepiece's default normalization (NFKC charsmap, extra whitespace removed)."""
    import sentencepiece as spm

    folder = _train_spm(tmp_path / kind, kind, True, nfkc=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = Tokenizer.from_path(folder)
    texts = ["ｆｕｌｌｗｉｄｔｈ ① ﬁ Ⅻ ㎏ Å", "  lots   of   space  ", " x", "tab\there\nnew"]
    for text in [*SPM_TEXTS, *texts]:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_spm_unknown_characters(spm_folder):
    import sentencepiece as spm

    folder, _, fallback = spm_folder
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = Tokenizer.from_path(folder)
    ids = ours.encode(UNSEEN, add_special_tokens=False)
    assert ids == sp.encode(UNSEEN)
    if fallback:
        assert ours.unk_id not in ids
        assert all(sp.is_byte(i) for i in ids[1:])
        assert ours.decode(ids) == UNSEEN
    else:
        assert ours.unk_id == sp.unk_id() == 0
        assert ours.unk_id in ids


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_spm_gguf_matches_sentencepiece(byte_fallback, tmp_path):
    """A GGUF vocabulary is scored-BPE (llama.cpp's SPM algorithm, whatever the model was trained
    as), equal to sentencepiece for a BPE-trained model."""
    import sentencepiece as spm

    folder = _train_spm(tmp_path / "spm", "bpe", byte_fallback)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = Tokenizer.from_path(_write_spm_gguf(folder / "tokenizer.model", tmp_path / "spm.gguf"))
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_ids == {2} and ours.unk_id == 0
    for text in [*SPM_TEXTS, UNSEEN]:
        assert ours.encode(text) == [1, *sp.encode(text)], text


@pytest.mark.slow
def test_spm_model_matches_transformers_llama_tokenizer(tmp_path):
    """transformers' LlamaTokenizer is scored BPE with byte fallback: compare it on the model it
    describes. (It drops unseen characters instead of giving UNK when the vocabulary has no byte
    pieces, and it gives "▁hi" for " hi" where sentencepiece gives "▁▁hi"; we follow
    sentencepiece there, tested above.)"""
    transformers = pytest.importorskip("transformers")
    folder = _train_spm(tmp_path / "spm", "bpe", True)
    ref = transformers.LlamaTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_path(folder)
    for text in [t for t in SPM_TEXTS if not t.startswith(" ")] + [UNSEEN]:
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected)
        assert ours.decode(expected, skip_special_tokens=True) == ref.decode(
            expected, skip_special_tokens=True
        )


def test_spm_streaming_detokenizer_keeps_spaces_and_bytes(spm_folder):
    folder, _, fallback = spm_folder
    ours = Tokenizer.from_path(folder)
    for text in [*SPM_TEXTS, UNSEEN, "Hello world again"]:
        ids = ours.encode(text)
        detok = ours.detokenizer()
        pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
        assert "".join(pieces) == ours.decode(ids), text
        if fallback:
            assert not any("\ufffd" in p for p in pieces)
    # the leading-space rule: the first word has no space, later words keep theirs
    ids = ours.encode("fib return", add_special_tokens=False)
    detok = ours.detokenizer()
    pieces = [detok.add_token(i) for i in ids]
    assert pieces[0] == ours.decode(ids[:1]) and "".join(pieces) == "fib return"


# -- Hugging Face folders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory) -> Path:
    """The default GGUF's tokenizer as transformers saves it (tokenizer.json + config)."""
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    reference.save_pretrained(str(folder))
    return folder


@pytest.mark.slow
def test_tokenizer_json_folder_matches_transformers(hf_folder):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    ours = Tokenizer.from_path(hf_folder)
    assert (ours.bos_id, ours.eos_ids, ours.unk_id, ours.pad_id) == (
        ref.bos_token_id,
        {ref.eos_token_id},
        ref.unk_token_id,
        ref.pad_token_id,
    )
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected
        assert ours.decode(expected) == ref.decode(expected)


def test_folder_eos_ids_are_a_union_and_pad_falls_back(hf_folder, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_path(folder)
    assert tok.eos_ids == {2, 0, 5}
    assert tok.eos_id == 2  # the tokenizer's own EOS token
    assert tok.pad_id == 2
    assert tok.encode("hi")[0] != tok.bos_id  # SmolLM2 adds no BOS

    config["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_path(folder)
    assert tok.add_bos and tok.encode("hi")[0] == tok.bos_id == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1


@pytest.mark.slow
def test_llama_style_tokenizer_json_adds_bos_like_transformers(tmp_path):
    """A SentencePiece model saved by transformers as tokenizer.json (post-processor adds <s>)."""
    transformers = pytest.importorskip("transformers")
    spm_dir = _train_spm(tmp_path / "spm", "bpe", True)
    saved = tmp_path / "saved"
    transformers.LlamaTokenizer.from_pretrained(str(spm_dir)).save_pretrained(str(saved))
    ref = transformers.AutoTokenizer.from_pretrained(str(saved))
    ours = Tokenizer.from_path(saved)
    assert ours.add_bos and ours.bos_id == ref.bos_token_id == 1
    for text in [t for t in SPM_TEXTS if not t.startswith(" ")] + [UNSEEN]:
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected)


def test_bad_inputs_are_one_line_tokenizer_errors(tmp_path):
    from engine.errors import TokenizerError

    cases = []
    cases.append(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(empty)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(20))
    cases.append(not_gguf)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + b"\x05")
    cases.append(truncated)
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{not json")
    cases.append(bad_json)
    bad_model = tmp_path / "badmodel"
    bad_model.mkdir()
    (bad_model / "tokenizer.model").write_bytes(b"\x00garbage")
    cases.append(bad_model)
    for case in cases:
        with pytest.raises(TokenizerError) as info:
            Tokenizer.from_path(case)
        assert str(case) in str(info.value) and "\n" not in str(info.value)


def test_streaming_detokenizer_on_random_ids(ours):
    """Any id sequence (invalid UTF-8 included): the segments concatenate to `decode(ids)`."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # byte-level tokens of single bytes >= 0x80 (lead and continuation bytes) plus ordinary ones
    byte_ids = [ours.token_to_id(ch) for ch in ("Ã", "Â", "¤", "½", "ł", "ĳ", "ð", "Ł")]
    ids = st.one_of(st.sampled_from([i for i in byte_ids if i is not None]), st.integers(0, 49151))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(ids, max_size=24))
    def check(seq):
        detok = ours.detokenizer()
        pieces = [detok.add_token(i) for i in seq] + [detok.finalize()]
        assert "".join(pieces) == ours.decode(seq)

    check()


def test_gpt2_byte_alphabet_matches_transformers():
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    from engine.vocab import gpt2_byte_alphabet

    assert gpt2_byte_alphabet() == convert.bytes_to_unicode()

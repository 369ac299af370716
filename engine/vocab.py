"""Vocabularies as `tokenizers` pipelines, and GGUF metadata read from a file's header.

- byte-level BPE (GPT-2 family, GGUF `tokenizer.ggml.model == "gpt2"`): GPT-2's pre-tokenizer, or
  the split regex named by `tokenizer.ggml.pre`, as transformers' GGUF converter builds it;
- SentencePiece (`tokenizer.model`, or GGUF `"llama"`): BPE by piece score (merges derived from
  the scores) or Unigram, byte fallback, `▁` for spaces, control pieces as special tokens.

This module builds pipelines; it knows nothing of BOS/EOS policy or chat templates (tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from engine.errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes for byte-level vocabularies whose `tokenizer.ggml.pre` is not GPT-2's. Those not
# listed (gpt2, smollm, starcoder, ...) use the GPT-2 pattern of `ByteLevel(use_regex=True)`,
# as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


# ---------------------------------------------------------------------------------------------
# GGUF metadata (header only: the tensors are not touched)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as Python values (the tensors are not touched).

    The header parser is the loader's (`engine.config.read_gguf_header`); its errors are
    re-raised as tokenizer errors with the same one-line message.
    """
    from engine.config import read_gguf_header
    from engine.errors import ModelLoadError

    try:
        return read_gguf_header(Path(path)).metadata
    except ModelLoadError as e:
        raise TokenizerError(str(e)) from None


def py_value(value: Any) -> Any:
    """Metadata from `mx.load(..., return_metadata=True)` or our reader, as plain Python."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# ---------------------------------------------------------------------------------------------
# Building `tokenizers` pipelines


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of bytes: printable Latin-1 as itself, the rest as chr(256 + n)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelling = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def byte_level_backend(
    tokens: list[str], merges: list[str], pre: str | None, types: Sequence[int] | None = None
) -> Backend:
    """Byte-level BPE (GPT-2 family): tokens are spelled in GPT-2's byte alphabet. An ordinary
    token the file spells in plain text is respelled (as transformers does); control tokens keep
    their text, since they are matched whole as special tokens."""
    spelling = gpt2_byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet and (types is None or types[i] != CONTROL):
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]) -> list:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (best first), ties by longer left part, then longer right
    part, then piece id (the order transformers' GGUF converter uses)."""
    vocab = {t: i for i, t in enumerate(tokens) if mergeable[i]}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                key = (-scores[i], -len(left), -len(right), i, vocab[left], vocab[right])
                ranked.append((key, left, right))
    ranked.sort(key=lambda r: r[0])
    return [(left, right) for _, left, right in ranked]


def sentencepiece_backend(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    kind: str,
    unk_id: int | None,
    add_prefix_space: bool,
    byte_fallback: bool,
) -> Backend:
    """A SentencePiece vocabulary as a `tokenizers` pipeline (spaces become `▁`)."""
    mergeable = [t in (NORMAL, USER_DEFINED) for t in types]
    if kind == "unigram":
        vocab = [
            (tok, float(s) if mergeable[i] or types[i] == UNKNOWN else -1e9)
            for i, (tok, s) in enumerate(zip(tokens, scores))
        ]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab_ids = {tok: i for i, tok in enumerate(tokens)}
        unk = tokens[unk_id] if unk_id is not None else None
        model = models.BPE(
            vocab=vocab_ids,
            merges=_spm_merges(tokens, scores, mergeable),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    backend = Backend(model)
    scheme = "first" if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=scheme, split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def add_typed_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (matched whole, skippable); user-defined
    tokens plain added tokens (matched whole)."""
    control = [
        AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL
    ]
    if control:
        backend.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == USER_DEFINED
    ]
    if user:
        backend.add_tokens(user)


def sentencepiece_model_file(path: Path) -> tuple[Backend, dict[str, Any]]:
    """`tokenizer.model`: pieces, scores and types read with the sentencepiece library."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece is a runtime dependency
        raise TokenizerError(
            f"{path}: reading it needs the 'sentencepiece' package ({e})"
        ) from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (no pieces)")
    # sentencepiece piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    model_type = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
    unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    norm = proto.normalizer_spec
    backend = sentencepiece_backend(
        tokens,
        scores,
        types,
        kind="unigram" if model_type == 1 else "bpe",
        unk_id=unk_id,
        add_prefix_space=norm.add_dummy_prefix,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # leading spaces are stripped by the Tokenizer before encoding, so that Metaspace still
        # sees the text start at offset 0 and prepends "▁"
        steps += [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Strip(left=False, right=True),
        ]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    add_typed_tokens(backend, tokens, types)
    ts = proto.trainer_spec
    specials = {
        "bos_token": tokens[ts.bos_id] if 0 <= ts.bos_id < len(tokens) else None,
        "eos_token": tokens[ts.eos_id] if 0 <= ts.eos_id < len(tokens) else None,
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "pad_token": tokens[ts.pad_id] if 0 <= ts.pad_id < len(tokens) else None,
        # the Llama convention for a bare tokenizer.model; tokenizer_config.json overrides it
        "add_bos_token": True,
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
    }
    return backend, specials

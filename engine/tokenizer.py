"""One `Tokenizer` over every vocabulary a model can ship, plus a streaming detokenizer.

Sources, in the order a folder is searched: `tokenizer.json` (HF `tokenizers`), `tokenizer.model`
(SentencePiece, converted to a `tokenizers` pipeline), or the vocabulary embedded in a `.gguf`:
`tokenizer.ggml.model == "gpt2"` is byte-level BPE (GPT-2 pre-tokenizer, or the split regex its
`tokenizer.ggml.pre` names), `"llama"` is SentencePiece (BPE by piece score, byte fallback, `▁`
for spaces). The GGUF rebuild follows what transformers' GGUF converter builds, so our ids equal
`AutoTokenizer.from_pretrained(folder, gguf_file=...)`.

Special-token semantics come from the model, never guessed: BOS is added only when the model says
so (`add_bos_token` in `tokenizer_config.json` / GGUF, else the `tokenizer.json` post-processor),
EOS ids are the union of the tokenizer's, `config.json`'s and `generation_config.json`'s, UNK is the
vocabulary's unknown piece where it has one, PAD falls back to EOS.

The pipelines themselves are built in `vocab.py`, chat templates rendered in `chat_template.py`;
this module knows nothing about models or generation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, models
from tokenizers import Tokenizer as _Backend

from engine.chat_template import ChatTemplate, pick_template
from engine.errors import TokenizerError
from engine.vocab import (
    BYTE,
    NORMAL,
    UNKNOWN,
    add_typed_tokens,
    byte_level_backend,
    py_value,
    read_gguf_metadata,
    sentencepiece_backend,
    sentencepiece_model_file,
)

__all__ = ["Tokenizer", "StreamingDetokenizer", "read_gguf_metadata"]


# ---------------------------------------------------------------------------------------------
# Reading a folder's JSON files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_set(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


# ---------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        unk_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        use_post_processor: bool = False,
        eos_id: int | None = None,
        sp_dummy_prefix: bool = False,
        sp_strip_leading: bool = False,
        chat_template: str | None = None,
        template_source: str = "chat template",
        name: str = "tokenizer",
    ):
        self._backend = backend
        self.name = name
        self.bos_id = bos_id
        self.eos_ids: set[int] = set(eos_ids)
        # the EOS token proper (the one appended, and named in templates)
        self.eos_id = eos_id if eos_id is not None else (min(eos_ids) if eos_ids else None)
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        # tokenizer.json's post-processor decides BOS/EOS when the config does not say
        self._use_post_processor = use_post_processor
        # SentencePiece prepends "▁" to the text even when it starts with a space ("▁▁hi" for
        # " hi"); Metaspace does not when the text already starts with one: we add that space
        self._sp_dummy_prefix = sp_dummy_prefix
        # SentencePiece's remove_extra_whitespaces drops leading spaces before the "▁" prefix
        self._sp_strip_leading = sp_strip_leading
        # a template the sandbox refuses fails chat, not loading (raw completion still works)
        self._template_error: TokenizerError | None = None
        self._template_text = chat_template
        if chat_template:
            try:
                self._template = ChatTemplate(chat_template, source=template_source)
            except TokenizerError as e:
                self._template, self._template_error = None, e
        else:
            self._template = ChatTemplate.fallback()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """From an HF folder (`tokenizer.json` / `tokenizer.model`), a `.gguf` file, or a folder
        holding one `.gguf`."""
        path = Path(path).expanduser()
        if path.is_file():
            if path.suffix == ".gguf":
                return cls.from_gguf(path)
            if path.name == "tokenizer.json" or path.suffix == ".model":
                return cls.from_path(path.parent)
            raise TokenizerError(f"{path}: not a tokenizer file (.gguf, tokenizer.json or .model)")
        if not path.is_dir():
            raise TokenizerError(f"{path}: no such file or folder")
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            return cls._from_hf_folder(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return cls.from_gguf(ggufs[0])
        if len(ggufs) > 1:
            raise TokenizerError(f"{path}: holds {len(ggufs)} .gguf files; name one")
        raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or .gguf file")

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Tokenizer:
        """From a GGUF file's embedded vocabulary. `metadata` (e.g. from `mx.load(path,
        return_metadata=True)`) saves reading the file's header again."""
        path = Path(path)
        meta = dict(metadata) if metadata is not None else read_gguf_metadata(path)
        return cls.from_gguf_metadata(meta, source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF") -> Tokenizer:
        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"tokenizer.{key}", default)
            return py_value(value)

        kind = get("ggml.model")
        tokens = get("ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{source}: no 'tokenizer.ggml.tokens' in the GGUF metadata")
        tokens = list(tokens)
        types = list(get("ggml.token_type") or [NORMAL] * len(tokens))
        if kind == "gpt2":
            merges = get("ggml.merges")
            if not merges:
                raise TokenizerError(
                    f"{source}: byte-level vocabulary without 'tokenizer.ggml.merges'"
                )
            backend = byte_level_backend(tokens, list(merges), get("ggml.pre"), types)
            add_bos_default = False
        elif kind == "llama":
            scores = get("ggml.scores")
            if scores is None:
                raise TokenizerError(
                    f"{source}: SentencePiece vocabulary without 'tokenizer.ggml.scores'"
                )
            backend = sentencepiece_backend(
                tokens,
                list(scores),
                types,
                kind="bpe",
                unk_id=_gguf_unk(meta, types),
                add_prefix_space=bool(get("ggml.add_space_prefix", True)),
                byte_fallback=any(t == BYTE for t in types),
            )
            add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies by default
        else:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama)"
            )
        add_typed_tokens(backend, tokens, types)

        def token_id(key: str) -> int | None:
            value = get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        unk_id = _gguf_unk(meta, types)
        eos = token_id("ggml.eos_token_id")
        eot = token_id("ggml.eot_token_id")
        eos_ids = {i for i in (eos, eot) if i is not None}
        add_bos = get("ggml.add_bos_token")
        add_eos = get("ggml.add_eos_token")
        return cls(
            backend,
            bos_id=token_id("ggml.bos_token_id"),
            eos_ids=eos_ids,
            unk_id=unk_id,
            pad_id=token_id("ggml.padding_token_id"),
            add_bos=bool(add_bos) if add_bos is not None else add_bos_default,
            add_eos=bool(add_eos) if add_eos is not None else False,
            eos_id=eos,
            sp_dummy_prefix=kind == "llama" and bool(get("ggml.add_space_prefix", True)),
            chat_template=get("chat_template"),
            template_source=f"{source}: tokenizer.chat_template",
            name=Path(source).name,
        )

    @classmethod
    def _from_hf_folder(cls, folder: Path) -> Tokenizer:
        config = _read_json(folder / "tokenizer_config.json")
        smap = _read_json(folder / "special_tokens_map.json")
        if (folder / "tokenizer.json").is_file():
            try:
                backend = _Backend.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
            spm_specials: dict[str, Any] = {}
        else:
            backend, spm_specials = sentencepiece_model_file(folder / "tokenizer.model")
            # added tokens the config lists (e.g. <|im_start|> added on top of the .model)
            extra = config.get("added_tokens_decoder") or {}
            for _idx, tok in sorted(extra.items(), key=lambda kv: int(kv[0])):
                content = _token_str(tok)
                if content is not None and backend.token_to_id(content) is None:
                    special = bool(tok.get("special", True)) if isinstance(tok, dict) else True
                    at = AddedToken(content, normalized=False, special=special)
                    (backend.add_special_tokens if special else backend.add_tokens)([at])

        def special(name: str) -> str | None:
            for source in (config, smap, spm_specials):
                value = _token_str(source.get(name))
                if value is not None:
                    return value
            return None

        def tid(text: str | None) -> int | None:
            return backend.token_to_id(text) if text is not None else None

        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        eos_ids = _id_set(tid(special("eos_token")))
        eos_ids |= _id_set(model_cfg.get("eos_token_id")) | _id_set(gen_cfg.get("eos_token_id"))
        bos_id = tid(special("bos_token"))
        if bos_id is None:
            bos_id = next(iter(_id_set(model_cfg.get("bos_token_id"))), None)
        pad_id = tid(special("pad_token"))
        if pad_id is None:
            pad_id = next(
                iter(_id_set(gen_cfg.get("pad_token_id") or model_cfg.get("pad_token_id"))), None
            )

        # The config's flags win; without them tokenizer.json's post-processor decides
        use_post = (folder / "tokenizer.json").is_file() and not (
            "add_bos_token" in config or "add_eos_token" in config
        )
        add_bos = bool(config.get("add_bos_token", spm_specials.get("add_bos_token", False)))
        add_eos = bool(config.get("add_eos_token", False))
        if use_post:
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and bos_id is not None and probe[0] == bos_id
            add_eos = bool(probe) and probe[-1] in eos_ids

        template = None
        tsource = f"{folder}: chat template"
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template, tsource = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        else:
            json_file = folder / "chat_template.json"
            cfg_path = folder / "tokenizer_config.json"
            template = pick_template(config.get("chat_template"), str(cfg_path))
            tsource = f"{cfg_path}: chat_template"
            if template is None and json_file.is_file():
                template = pick_template(_read_json(json_file).get("chat_template"), str(json_file))
                tsource = str(json_file)
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=eos_ids,
            unk_id=_unk_of(backend, tid(special("unk_token"))),
            pad_id=pad_id,
            add_bos=add_bos,
            add_eos=add_eos,
            use_post_processor=use_post,
            eos_id=tid(special("eos_token")),
            sp_dummy_prefix=bool(spm_specials.get("add_dummy_prefix")),
            sp_strip_leading=bool(spm_specials.get("remove_extra_whitespaces")),
            chat_template=template,
            template_source=tsource,
            name=folder.name,
        )

    # -- encoding --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_id)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The special token strings a chat template may use."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.id_to_token(self.unk_id),
            "pad_token": self.id_to_token(self.pad_id),
        }

    def id_to_token(self, token_id: int | None) -> str | None:
        return self._backend.id_to_token(token_id) if token_id is not None else None

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. With
        `add_special_tokens`, BOS/EOS are added as the model asks."""
        if self._sp_strip_leading:
            text = text.lstrip(" ")
        elif self._sp_dummy_prefix and text.startswith(" "):
            text = " " + text
        if self._use_post_processor:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.add_eos and self.eos_id is not None:
                ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        return self._template.template if self._template else (self._template_text or "")

    @property
    def chat_template_is_fallback(self) -> bool:
        return self._template is not None and self._template.is_fallback

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text of a conversation, rendered by the model's template."""
        if self._template is None:
            raise self._template_error  # type: ignore[misc]
        return self._template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
            f"eos={sorted(self.eos_ids)}, add_bos={self.add_bos})"
        )


def _gguf_unk(meta: Mapping[str, Any], types: list[int]) -> int | None:
    value = py_value(meta.get("tokenizer.ggml.unknown_token_id"))
    if value is not None and 0 <= int(value) < len(types):
        return int(value)
    return next((i for i, t in enumerate(types) if t == UNKNOWN), None)


def _unk_of(backend: _Backend, configured: int | None) -> int | None:
    if configured is not None:
        return configured
    model = backend.model
    if isinstance(model, models.Unigram):
        return getattr(model, "unk_id", None)
    unk = getattr(model, "unk_token", None)
    return backend.token_to_id(unk) if unk else None


class StreamingDetokenizer:
    """Token ids in, text out, one token at a time, never emitting half a character.

    Each step decodes a short window (the last emitted token(s) as context, plus the new ones) and
    emits only the text beyond the context, so SentencePiece's leading-space rule and multi-token
    UTF-8 sequences come out right; text ending in U+FFFD (an incomplete byte sequence) is held
    back until the next token completes it. The concatenation of all segments (including
    `finalize()`'s) equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.last_segment = ""
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the emitted part

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add_token(self, token_id: int) -> str:
        """Adds one token; returns (and keeps in `last_segment`) the new text, maybe ""."""
        self.tokens.append(int(token_id))
        context = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        segment = ""
        if len(window) > len(context) and not window.endswith("\ufffd"):
            segment = window[len(context) :]
            self._prefix, self._read = self._read, len(self.tokens)
        self.last_segment = segment
        self.text += segment
        return segment

    def finalize(self) -> str:
        """Flushes whatever is held back (an incomplete sequence decodes as U+FFFD)."""
        context = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        segment = window[len(context) :] if len(window) > len(context) else ""
        self._prefix = self._read = len(self.tokens)
        self.last_segment = segment
        self.text += segment
        return segment

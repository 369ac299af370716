"""`Engine`: the one object the GUI, the CLI and the server talk to.

It holds at most one loaded model, renders chat templates, and streams `Event`s from
`engine.generate.stream_generate`. Generation is serialised by a lock; `cancel()` may be called
from any thread and ends the running stream within one token.

Prompt reuse: the KV caches of recent conversations are kept in a small LRU bounded by memory.
A new request takes the entry sharing the longest token prefix with its prompt, trims it to
that prefix and prefills only the rest, so turn 2 of a chat costs only its new tokens
(`stats.cached_tokens`). An entry that would lose most of its tokens is forked (copied up to
the shared prefix) instead of trimmed, so switching between chats keeps each one warm.

Speculative decoding: `load_draft(path)` (or `attach_draft(loaded)`) adds a small draft model
sharing the tokenizer; every stream then decodes speculatively (engine/speculative.py), with
its own prefix cache for the draft. Loading another model drops the draft.

The Engine knows nothing about Qt, HTTP or storage of conversations.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ContextLengthError, LatentError
from engine.generate import (
    Event,
    context_length_of,
    read_generation_config,
    stream_generate,
)
from engine.sampling import SamplingParams

DEFAULT_PREFIX_CACHE_BYTES = int(os.environ.get("LATENT_PREFIX_CACHE_MB", "1024")) * 2**20
DEFAULT_PREFIX_CACHE_ENTRIES = 4


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _PrefixEntry:
    tokens: list[int] = field(default_factory=list)  # what the cache holds, position by position
    cache: list | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(c, "nbytes", 0)) for c in self.cache or [])


class PrefixCache:
    """An LRU of (token ids, per-layer cache) pairs, bounded by entry count and bytes."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, max_entries: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: list[_PrefixEntry] = []  # least recently used first

    def clear(self) -> None:
        self.entries.clear()

    def take(self, model: Any, ids: list[int]) -> tuple[list, int]:
        """A cache holding the first n tokens of `ids` (n < len(ids)), removed from the LRU."""
        best, best_n = None, 0
        for e in self.entries:
            n = common_prefix_len(e.tokens, ids)
            if n > best_n:
                best, best_n = e, n
        n = min(best_n, len(ids) - 1)  # at least one token must be fed to get logits
        if best is None or n <= 0 or not all(_trimmable(c) for c in best.cache):
            return model.make_cache(), 0
        if 2 * n >= len(best.tokens):
            self.entries.remove(best)
            cache = best.cache
        else:
            cache = _fork(model, best.cache)  # keep the other conversation intact
        for c in cache:
            c.trim(c.offset - n)
        return cache, n

    def put(self, tokens: list[int], cache: list) -> None:
        held = int(getattr(cache[0], "offset", 0)) if cache else 0
        entry = _PrefixEntry(tokens=list(tokens[:held]), cache=cache)
        if not entry.tokens:
            return
        self.entries.append(entry)
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries
            or sum(e.nbytes for e in self.entries) > self.max_bytes
        ):
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _trimmable(c: Any) -> bool:
    f = getattr(c, "is_trimmable", None)
    return bool(f()) if callable(f) else hasattr(c, "trim")


def _fork(model: Any, cache: list) -> list:
    new = model.make_cache()
    for dst, src in zip(new, cache, strict=True):
        dst.state = src.state  # MLX arrays are values: later writes to dst copy, src is untouched
        dst.meta_state = src.meta_state
    return new


class Engine:
    """Load a model, chat with it, cancel, inspect. Safe to drive from a worker thread."""

    def __init__(self, *, prefill_chunk: int = 512, prefix_cache_bytes: int | None = None) -> None:
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()  # any thread may finish a stream
        # One flag per request: cancel() sets the newest request's flag, load()/unload() also
        # the running one's; a new request never clears a cancel meant for an older one.
        self._cancel = threading.Event()
        self._running_cancel: threading.Event | None = None
        self._loaded: Any = None
        self._source: str | None = None
        self._load_kwargs: dict[str, Any] = {}
        self.prefix_cache = PrefixCache(
            prefix_cache_bytes if prefix_cache_bytes is not None else DEFAULT_PREFIX_CACHE_BYTES,
            DEFAULT_PREFIX_CACHE_ENTRIES,
        )
        self.last_stats = None
        self._draft: Any = None
        self.num_draft: int | None = None  # None: engine.speculative.DEFAULT_NUM_DRAFT
        self.draft_prefix_cache = PrefixCache(
            self.prefix_cache.max_bytes, DEFAULT_PREFIX_CACHE_ENTRIES
        )

    # --- model lifecycle -------------------------------------------------------------------

    def load(self, path_or_repo: str | os.PathLike, adapter: str | os.PathLike | None = None, **kw):
        """Load a model (replacing any loaded one); returns its `ModelInfo`."""
        from engine.loading import load

        self._stop_all()  # a running stream ends within one token and releases the lock
        with self._lock:
            self._loaded = None
            self.prefix_cache.clear()
            self._drop_draft()
            loaded = load(path_or_repo, adapter, **kw)
            self._loaded = loaded
            self._source = str(path_or_repo)
            self._load_kwargs = dict(kw)
            return loaded.info

    def attach(self, loaded: Any) -> None:
        """Use an already loaded `LoadedModel` (tests, benchmarks)."""
        with self._lock:
            self.prefix_cache.clear()
            self._drop_draft()
            self._loaded = loaded
            self._source = str(getattr(loaded, "path", ""))

    def unload(self) -> None:
        self._stop_all()
        with self._lock:
            self._loaded = None
            self.prefix_cache.clear()
            self._drop_draft()
            import mlx.core as mx

            mx.clear_cache()

    def set_adapter(self, path: str | os.PathLike | None):
        """Reload the current model with a LoRA adapter (or without one when None)."""
        if self._source is None:
            raise LatentError("no model is loaded: load one before setting an adapter")
        if path is not None and not Path(path).exists():
            raise LatentError(f"{path}: adapter not found")
        draft, num_draft = self._draft, self.num_draft
        info = self.load(self._source, path, **self._load_kwargs)
        if draft is not None:  # same tokenizer as before: keep speculating
            self.attach_draft(draft, num_draft=num_draft)
        return info

    # --- speculative decoding --------------------------------------------------------------

    def load_draft(
        self, path_or_repo: str | os.PathLike | None, *, num_draft: int | None = None, **kw
    ):
        """Load a draft model for speculative decoding (None: stop speculating).

        Returns the draft's `ModelInfo`; `LatentError` when it does not share the loaded
        model's tokenizer.
        """
        if path_or_repo is None:
            self.attach_draft(None)
            return None
        from engine.loading import load

        self._need()
        draft = load(path_or_repo, **kw)
        self.attach_draft(draft, num_draft=num_draft)
        return draft.info

    def attach_draft(self, draft: Any, *, num_draft: int | None = None) -> None:
        """Use an already loaded draft `LoadedModel` (None: stop speculating)."""
        from engine.speculative import check_draft, check_num_draft

        if draft is not None:
            check_draft(self._need(), draft)
            if num_draft is not None:
                check_num_draft(num_draft)
        with self._lock:
            self._drop_draft()
            self._draft = draft
            if draft is not None:
                self.num_draft = num_draft

    @property
    def draft(self) -> Any:
        """The draft `LoadedModel`, or None when decoding is not speculative."""
        return self._draft

    def _drop_draft(self) -> None:
        self._draft = None
        self.draft_prefix_cache.clear()

    @property
    def loaded(self) -> Any:
        return self._loaded

    def info(self):
        return None if self._loaded is None else self._loaded.info

    def _need(self) -> Any:
        if self._loaded is None:
            raise LatentError("no model is loaded")
        if self._loaded.tokenizer is None:
            raise LatentError(f"{self._loaded.path}: the model has no tokenizer")
        return self._loaded

    @property
    def context_length(self) -> int:
        return context_length_of(self._need())

    def generation_defaults(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (defaults where absent)."""
        gen = read_generation_config(getattr(self._need(), "path", None))
        p = SamplingParams()
        changes: dict[str, Any] = {}
        for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                changes[key] = float(gen[key])
        if gen.get("top_k") is not None:
            changes["top_k"] = int(gen["top_k"])
        if gen.get("max_new_tokens"):
            changes["max_tokens"] = int(gen["max_new_tokens"])
        if gen.get("do_sample") is False:
            changes["temperature"] = 0.0
        return p.replace(**changes)

    # --- prompts ---------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]]) -> tuple[list[int], bool]:
        """Token ids of the chat-templated conversation, and whether the template was a fallback."""
        tok = self._need().tokenizer
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes its own special tokens (BOS included), as transformers does.
        ids = tok.encode(text, add_special_tokens=False)
        return list(ids), bool(getattr(tok, "chat_template_is_fallback", False))

    def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.render(messages)[0])

    def cancel(self) -> None:
        """Stop the running generation (thread-safe); it ends within one token."""
        self._stop_all()

    def _stop_all(self) -> None:
        self._cancel.set()
        running = self._running_cancel
        if running is not None:
            running.set()

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> Iterator[Event]:
        """Stream the assistant's reply to `messages` ([{"role", "content"}, ...])."""
        ids, fallback = self.render(messages)
        return self._start(ids, params, fallback)

    def complete(self, prompt: str, params: SamplingParams | None = None) -> Iterator[Event]:
        """Stream a continuation of raw text (no chat template)."""
        ids = list(self._need().tokenizer.encode(prompt, add_special_tokens=True))
        return self._start(ids, params, False)

    def generate_ids(self, ids: list[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Stream from ready token ids (benchmarks, tests)."""
        return self._start(list(ids), params, False)

    def _start(self, ids: list[int], params: SamplingParams | None, fallback: bool):
        ctx = self.context_length
        if not ids:
            raise LatentError("the prompt is empty: nothing to generate from")
        if len(ids) >= ctx:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens but the model's context is {ctx} tokens"
            )
        flag = self._cancel = threading.Event()  # a cancel() from here on stops this request
        return self._run(ids, params or SamplingParams(), fallback, flag)

    def _run(
        self, ids: list[int], params: SamplingParams, fallback: bool, flag: threading.Event
    ) -> Iterator[Event]:
        with self._lock:
            self._running_cancel = flag
            loaded = self._need()
            cache, n_cached = self.prefix_cache.take(loaded.model, ids)
            draft = self._draft
            spec: dict[str, Any] = {}
            if draft is not None:
                dcache, dn = self.draft_prefix_cache.take(draft.model, ids)
                spec = dict(
                    draft=draft, num_draft=self.num_draft, draft_cache=dcache, draft_num_cached=dn
                )
            generated: list[int] = []
            keep = False
            try:
                for ev in stream_generate(
                    loaded,
                    ids,
                    params,
                    flag,
                    cache=cache,
                    num_cached=n_cached,
                    prefill_chunk=self.prefill_chunk,
                    template_fallback=fallback,
                    **spec,
                ):
                    if ev.token_id is not None:
                        generated.append(ev.token_id)
                    if ev.done:
                        self.last_stats = ev.stats
                    yield ev
                keep = True
            except GeneratorExit:
                keep = True  # the caller stopped reading; the cache is consistent
                raise
            finally:
                self._running_cancel = None
                # After an error we do not know what the cache holds: drop it.
                if keep:
                    self.prefix_cache.put(ids + generated, cache)
                    if spec:
                        self.draft_prefix_cache.put(ids + generated, spec["draft_cache"])

"""The generation loop: prompt ids in, a stream of tokens and text out.

`generate_step` is the hot loop. It prefills the prompt in chunks (evaluating only the cache,
so the LM head never runs on prompt positions), then decodes one token at a time with the
cache. Each step is queued with `mx.async_eval` before the previous token is handed out, so the
next forward pass runs while the caller detokenizes; the only host sync per token is reading
that token's id.

`stream_generate` wraps it for front ends: streaming detokenization (never broken UTF-8),
stopping on any EOS id, on stop strings (text that could still become a stop string is held
back, so partial stop text never leaks), on max tokens and on the context limit, cancellation,
and `GenerationStats`. It knows nothing about chat templates or conversations (see session.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from engine.blas import use_blas_prefill
from engine.errors import ContextLengthError, LatentError
from engine.quant.cpu import log_softmax
from engine.sampling import (
    LogitsProcessor,
    Sampler,
    SamplingParams,
    make_logits_processors,
    sampler_for,
)

DEFAULT_CONTEXT = 4096


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str = ""  # "stop" | "length" | "context" | "cancelled"
    template_fallback: bool = False
    total_s: float = 0.0
    # Speculative decoding only (engine/speculative.py): draft tokens checked / kept.
    draft_proposed: int = 0
    draft_accepted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Event:
    """One step of a stream: new text (may be ""), the token that produced it, or the end."""

    text: str
    token_id: int | None = None
    done: bool = False
    stats: GenerationStats | None = None
    # Only when `SamplingParams.logprobs` is set: the token's text and log-probability, and the
    # top alternatives as (text, log-probability), most likely first.
    token_text: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None


def token_logprobs(tokenizer, token: int, logprobs: mx.array, top: int) -> dict:
    """The Event fields for one token: its text and log-probability, and `top` alternatives."""
    fields = {"token_text": tokenizer.decode([token]), "logprob": logprobs[token].item()}
    alts: list[tuple[str, float]] = []
    if top > 0:
        top = min(top, logprobs.shape[-1])
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[ids]
        order = mx.argsort(-vals)
        for i, v in zip(ids[order].tolist(), vals[order].tolist()):
            alts.append((tokenizer.decode([i]), v))
    fields["top_logprobs"] = alts
    return fields


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _eval_cache(cache: list) -> None:
    mx.eval([c.state for c in cache])


def generate_step(
    model: Callable,
    prompt_ids: Sequence[int] | mx.array,
    cache: list,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    prefill_chunk: int = 512,
    *,
    num_cached: int = 0,
    max_tokens: int | None = None,
    cancel: CancelFlag | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token_id, logprobs (vocab,))` forever (or `max_tokens` times).

    `cache` already holds the first `num_cached` prompt tokens; only the rest is prefilled,
    but logits processors still see the whole prompt. At least one prompt token must be
    uncached (it is fed to produce the first logits).
    """
    ids = (
        mx.array(prompt_ids, dtype=mx.int32) if not isinstance(prompt_ids, mx.array) else prompt_ids
    )
    n_total = ids.size
    if num_cached >= n_total:
        raise ValueError(
            f"num_cached={num_cached} leaves no prompt token to feed (prompt has {n_total})"
        )
    # on the CPU: our kernels, and OpenBLAS sgemm for prompt chunks (idempotent, ~1 ms)
    use_blas_prefill(model)
    sampler = sampler or _greedy
    procs = logits_processors or []
    history = ids
    to_feed = ids[num_cached:]
    n = to_feed.size

    # Prefill all but the last prompt token, chunk by chunk; only the cache is evaluated.
    pos = 0
    while n - pos > 1:
        take = min(prefill_chunk, n - 1 - pos)
        model(to_feed[pos : pos + take][None], cache=cache)
        _eval_cache(cache)
        pos += take
        if on_prefill is not None:
            on_prefill(pos, n)
        if cancel is not None and cancel.is_set():
            return

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :]  # (1, V)
        for p in procs:
            logits = p(history, logits)
        logprobs = log_softmax(logits)
        return sampler(logprobs), logprobs[0]

    y, logprobs = step(to_feed[pos:])
    mx.async_eval(y, logprobs)
    produced = 0
    while True:
        produced += 1
        if max_tokens is None or produced < max_tokens:
            if procs:
                history = mx.concatenate([history, y])
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        else:
            next_y = next_logprobs = None
        yield int(y.item()), logprobs
        if next_y is None:
            return
        y, logprobs = next_y, next_logprobs


class _StopScanner:
    """Releases streamed text while holding back any tail that could start a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        # A match can only start inside `pending`: anything that could begin one is held back.
        first = -1
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            out = self.pending[:first]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _as_int_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int | float):
        return {int(value)}
    return {int(v) for v in value}


def eos_ids_for(loaded: Any) -> set[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json, together."""
    ids = set(getattr(loaded.tokenizer, "eos_ids", None) or ())
    ids |= _as_int_set((getattr(loaded, "config", None) or {}).get("eos_token_id"))
    gen = read_generation_config(getattr(loaded, "path", None))
    ids |= _as_int_set(gen.get("eos_token_id"))
    return ids


def read_generation_config(path: Any) -> dict:
    """generation_config.json beside the model, or {} (a .gguf file has none)."""
    if path is None:
        return {}
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    f = folder / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def context_length_of(loaded: Any) -> int:
    info = getattr(loaded, "info", None)
    n = getattr(info, "context_length", None)
    if n:
        return int(n)
    cfg = getattr(loaded, "config", None) or {}
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        if cfg.get(key):
            return int(cfg[key])
    return DEFAULT_CONTEXT


def stream_generate(
    loaded: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    cancel: CancelFlag | None = None,
    *,
    cache: list | None = None,
    num_cached: int = 0,
    prefill_chunk: int = 512,
    template_fallback: bool = False,
    context_length: int | None = None,
    draft: Any = None,
    num_draft: int | None = None,
    draft_cache: list | None = None,
    draft_num_cached: int = 0,
) -> Iterator[Event]:
    """Generate from `prompt_ids`; yields an `Event` per token and a final `done` event.

    Raises `ContextLengthError` at once (not on first iteration) when the prompt does not fit.
    Pass `cache` (holding the first `num_cached` prompt tokens) to reuse a prefix. With a `draft`
    (a loaded model sharing the tokenizer) decoding is speculative (engine/speculative.py):
    `num_draft` proposals per round, `draft_cache` holding its first `draft_num_cached` tokens.
    """
    params = params or SamplingParams()
    prompt_ids = list(prompt_ids)
    ctx = int(context_length or context_length_of(loaded))
    if not prompt_ids:
        raise LatentError("the prompt is empty: nothing to generate from")
    if len(prompt_ids) >= ctx:
        raise ContextLengthError(
            f"prompt is {len(prompt_ids)} tokens but the model's context is {ctx} tokens"
        )
    spec = None
    if draft is not None:
        from engine.speculative import DEFAULT_NUM_DRAFT, check_draft, check_num_draft

        check_draft(loaded, draft)
        num_draft = check_num_draft(DEFAULT_NUM_DRAFT if num_draft is None else num_draft)
        if draft_cache is None:
            draft_cache, draft_num_cached = draft.model.make_cache(), 0
        spec = (draft, num_draft, draft_cache, draft_num_cached)
    return _stream(
        loaded,
        prompt_ids,
        params,
        cancel,
        cache,
        num_cached,
        prefill_chunk,
        template_fallback,
        ctx,
        spec,
    )


def _stream(
    loaded,
    prompt_ids,
    params,
    cancel,
    cache,
    num_cached,
    prefill_chunk,
    template_fallback,
    ctx,
    spec=None,
):
    model = loaded.model
    tokenizer = loaded.tokenizer
    eos = eos_ids_for(loaded)
    if cache is None:
        cache = model.make_cache()
        num_cached = 0
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids), cached_tokens=num_cached, template_fallback=template_fallback
    )
    room = ctx - len(prompt_ids)
    max_tokens = room if params.max_tokens is None else int(params.max_tokens)
    limit = min(max_tokens, room)
    limit_reason = "length" if max_tokens <= room else "context"
    detok = tokenizer.detokenizer()
    scanner = _StopScanner(params.stop)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_first = None
    finish = None
    counts = None

    def finish_event(reason: str, tail: str = "") -> Event:
        t_end = time.perf_counter()
        stats.finish_reason = reason
        stats.total_s = t_end - t0
        if t_first is not None:
            stats.ttft_s = t_first - t0
            stats.prefill_tps = (len(prompt_ids) - num_cached) / max(stats.ttft_s, 1e-9)
            # Tokens that arrived with the first one (a speculative round) took no decode time.
            first = max(1, counts.first_emitted) if counts is not None else 1
            if stats.generated_tokens > first:
                stats.decode_tps = (stats.generated_tokens - first) / max(t_end - t_first, 1e-9)
        if counts is not None:
            stats.draft_proposed, stats.draft_accepted = counts.proposed, counts.accepted
        stats.peak_memory_bytes = int(mx.get_peak_memory())
        return Event(text=tail, token_id=None, done=True, stats=stats)

    if limit <= 0:
        yield finish_event(limit_reason)
        return

    if spec is not None:
        from engine.speculative import DraftCounts, speculative_generate_step

        draft, num_draft, draft_cache, draft_num_cached = spec
        counts = DraftCounts()
        steps = speculative_generate_step(
            model,
            draft.model,
            prompt_ids,
            cache,
            draft_cache,
            params,
            num_draft=num_draft,
            prefill_chunk=prefill_chunk,
            num_cached=num_cached,
            draft_num_cached=draft_num_cached,
            max_tokens=limit,
            cancel=cancel,
            counts=counts,
            draft_context=context_length_of(draft),
        )
    else:
        steps = generate_step(
            model,
            prompt_ids,
            cache,
            sampler_for(params),
            make_logits_processors(params),
            prefill_chunk,
            num_cached=num_cached,
            max_tokens=limit,
            cancel=cancel,
        )
    try:
        for token, step_logprobs in steps:
            extra = (
                token_logprobs(tokenizer, token, step_logprobs, params.logprobs)
                if params.logprobs is not None
                else {}
            )
            if t_first is None:
                t_first = time.perf_counter()
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            stats.generated_tokens += 1
            if token in eos:
                finish = "stop"
                break
            detok.add_token(token)
            text, stopped = scanner.feed(detok.last_segment)
            if stopped:
                yield Event(text=text, token_id=token, **extra)
                yield finish_event("stop")
                return
            yield Event(text=text, token_id=token, **extra)
            if stats.generated_tokens >= limit:
                finish = limit_reason
                break
        else:
            # generate_step returned early: cancelled during prefill.
            finish = "cancelled"
    finally:
        steps.close()
    if finish == "cancelled":
        yield finish_event("cancelled", scanner.flush())
        return
    detok.finalize()
    text, stopped = scanner.feed(detok.last_segment)
    if not stopped:
        text += scanner.flush()
    yield finish_event("stop" if stopped else finish, text)

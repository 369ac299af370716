"""Batched decoding: several requests share one forward pass per decode step.

`BatchGenerator` serves many prompts at once (continuous batching). Each `step()`:
  1. admits waiting requests while there is room (FIFO, up to `max_rows` rows), taking a
     prefix-cache entry for each when one is given;
  2. prefills one chunk of one admitted prompt (chunked, so a long prompt only delays the
     running rows by one chunk per step);
  3. decodes one token for every row whose prompt is in, in ONE forward pass;
  4. turns each row's token into `Event`s exactly as `stream_generate` does (stop strings,
     EOS, max tokens, context, logprobs, cancel); a finished row leaves at once.

Rows are ragged: each keeps its own per-layer cache (its own length, its own prefix-cache
entry), the embedding, norms, projections, MLP and LM head run on the stacked (B, 1, hidden)
rows, and only attention runs row by row against that row's cache. Measured against the
alternative (one left-padded (B, H, S, D) cache with per-row RoPE offsets and a padding mask):
padding moved logits by up to 5e-5 (the softmax and value sums over padded keys reduce in
another order), per-row attention moves them by 0, and both cost the same per step here
(`bench/server.py --engine`).

Exactness: a row's result equals the same request decoded alone as long as the linear layers
compute each row of a (B, 1, hidden) input as they compute a (1, 1, hidden) one. That holds for
the per-row quantized kernels (engine/quant/cpu.py, MLX's quantized matmul), not for the
dequantize + GEMM path that takes over from `PREFILL_MIN_ROWS` rows, so `exact_rows` probes the
model's own layers once and caps the batch below the first row count that changes a row's
result. Sampling, penalties and seeds are per row, so seeded sampling reproduces too.

The llama family (llama, mistral, qwen2, qwen3, SmolLM2: `engine.models.llama` decoder layers) is
supported; `batch_unsupported(model)` says why another model is not (its callers serve it one
request at a time). This module knows nothing of HTTP, threads or chat templates: prompts arrive
as token ids, and whoever owns the thread calls `step()`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from engine.blas import use_blas_prefill
from engine.errors import ContextLengthError, LatentError
from engine.generate import (
    CancelFlag,
    Event,
    GenerationStats,
    _StopScanner,
    context_length_of,
    eos_ids_for,
    token_logprobs,
)
from engine.layers.attention import create_attention_mask, scaled_dot_product_attention
from engine.quant.cpu import log_softmax
from engine.sampling import SamplingParams, make_logits_processors, sampler_for

DEFAULT_MAX_BATCH = 8


def batch_unsupported(model: Any) -> str | None:
    """Why `model` cannot be decoded in a batch here, or None when it can."""
    from engine.models import llama

    kind = getattr(model, "model_type", type(model).__name__)
    if not isinstance(model, llama.Model):
        return f"model type {kind!r} has no batched decode (llama family only)"
    for layer in model.layers:
        if type(layer) is not llama.DecoderLayer or type(layer.self_attn) is not llama.Attention:
            return f"model type {kind!r} has non-llama decoder layers"
    return None


def _rows_equal(layer: Any, x: mx.array, alone: list[mx.array], n: int) -> bool:
    y = layer(x[:n])
    return all(mx.array_equal(y[i : i + 1], alone[i]).item() for i in range(n))


def exact_rows(model: Any, max_rows: int) -> int:
    """The most rows (<= max_rows) whose decode step computes every row as a lone request would.

    Probes the first decoder layer's projections (the layers every row goes through) with random
    rows: a kernel that switches arithmetic with the row count shows it on any input.
    """
    layer, args = model.layers[0], model.args
    probes = [
        (layer.self_attn.q_proj, args.hidden_size),
        (layer.mlp.gate_proj, args.hidden_size),
        (layer.mlp.down_proj, args.intermediate_size),
    ]
    inputs = []
    for lin, dims in probes:
        x = mx.random.normal((max_rows, 1, dims), key=mx.random.key(dims))
        inputs.append((lin, x, [lin(x[i : i + 1]) for i in range(max_rows)]))
    best = 1
    for n in range(2, max_rows + 1):
        if not all(_rows_equal(lin, x, alone, n) for lin, x, alone in inputs):
            break
        best = n
    return best


@dataclass
class _Row:
    """One request: its prompt, its cache and everything `stream_generate` keeps per stream."""

    uid: int
    ids: list[int]
    params: SamplingParams
    cancel: CancelFlag | None
    template_fallback: bool
    limit: int
    limit_reason: str
    cache: list | None = None
    num_cached: int = 0
    fed: int = 0  # prompt positions in the cache; decoding starts at len(ids) - 1
    sampler: Any = None
    procs: list = field(default_factory=list)
    history: mx.array | None = None  # prompt + generated ids, only when procs need them
    feed: mx.array | None = None  # (1,) the token this row feeds at its next decode step
    produced: int = 0  # tokens sampled, including one still being computed
    done: bool = False
    generated: list[int] = field(default_factory=list)
    detok: Any = None
    scanner: _StopScanner | None = None
    stats: GenerationStats | None = None
    t0: float = 0.0
    t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.ids) - 1


class BatchGenerator:
    """Decodes many requests together; `submit` adds one, `step` advances them all.

    `prefix_cache` (an `engine.session.PrefixCache`) lends each prompt the longest cached prefix
    and takes back each finished row's cache, as `Engine` does for lone requests.
    """

    def __init__(
        self,
        loaded: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = 512,
        prefix_cache: Any = None,
        context_length: int | None = None,
        exact: bool = True,
    ) -> None:
        reason = batch_unsupported(loaded.model)
        if reason is not None:
            raise LatentError(f"cannot batch this model: {reason}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.context_length = int(context_length or context_length_of(loaded))
        self.eos = eos_ids_for(loaded)
        self.window = getattr(self.model.args, "window", None)
        # the same CPU paths generate_step switches on, so rows match a lone request
        use_blas_prefill(self.model)
        self.max_rows = exact_rows(self.model, max_batch) if exact else max_batch
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._in_flight: list[tuple[_Row, mx.array, mx.array]] = []  # queued, not yet read
        self._next_uid = 0
        self.peak_rows = 0  # the most rows decoded in one step so far

    # --- queue -----------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        cancel: CancelFlag | None = None,
        *,
        template_fallback: bool = False,
    ) -> int:
        """Queue a prompt; returns its id. Raises at once when it cannot be served."""
        ids = [int(i) for i in prompt_ids]
        params = params or SamplingParams()
        ctx = self.context_length
        if not ids:
            raise LatentError("the prompt is empty: nothing to generate from")
        if len(ids) >= ctx:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens but the model's context is {ctx} tokens"
            )
        room = ctx - len(ids)
        max_tokens = room if params.max_tokens is None else int(params.max_tokens)
        uid = self._next_uid
        self._next_uid += 1
        self._waiting.append(
            _Row(
                uid=uid,
                ids=ids,
                params=params,
                cancel=cancel,
                template_fallback=template_fallback,
                limit=min(max_tokens, room),
                limit_reason="length" if max_tokens <= room else "context",
            )
        )
        return uid

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def uids(self) -> list[int]:
        """Every request not finished yet (running, then waiting)."""
        return [r.uid for r in self._rows] + [r.uid for r in self._waiting]

    def clear(self) -> None:
        """Forget every request (after an error: their caches are not returned)."""
        self._rows.clear()
        self._waiting.clear()
        self._in_flight = []

    # --- one step --------------------------------------------------------------------------

    def step(self) -> list[tuple[int, Event]]:
        """Advance every request by at most one token; returns (request id, Event) in order.

        Pipelined like `generate_step`: the next forward pass is queued (`mx.async_eval`) before
        the previous one's tokens are read and turned into events, so the host's work overlaps
        the model's. A row's first token therefore arrives one call after its prompt is in.
        """
        out: list[tuple[int, Event]] = []
        self._admit(out)
        for row in list(self._rows):
            if row.cancel is not None and row.cancel.is_set():
                self._finish(row, "cancelled", out, flush_only=True)
        for row in self._rows:
            if row.prefilling:
                self._prefill_chunk(row)
                break
        ready = [r for r in self._rows if not r.prefilling and r.produced < r.limit]
        launched = self._launch(ready) if ready else []
        for row, y, logprobs in self._in_flight:
            if not row.done:  # a row that finished meanwhile drops its last computed token
                self._emit(row, int(y.item()), logprobs, out)
        self._in_flight = launched
        return out

    def _admit(self, out: list) -> None:
        while self._waiting and len(self._rows) < self.max_rows:
            row = self._waiting.popleft()
            row.t0 = time.perf_counter()
            row.stats = GenerationStats(
                prompt_tokens=len(row.ids), template_fallback=row.template_fallback
            )
            row.detok = self.tokenizer.detokenizer()
            row.scanner = _StopScanner(row.params.stop)
            if row.cancel is not None and row.cancel.is_set():
                self._finish_event(row, "cancelled", "", out)
                continue
            if row.limit <= 0:
                self._finish_event(row, row.limit_reason, "", out)
                continue
            if self.prefix_cache is not None:
                row.cache, row.num_cached = self.prefix_cache.take(self.model, row.ids)
            else:
                row.cache, row.num_cached = self.model.make_cache(), 0
            row.fed = row.num_cached
            row.stats.cached_tokens = row.num_cached
            row.sampler = sampler_for(row.params)
            row.procs = make_logits_processors(row.params)
            if row.procs:
                row.history = mx.array(row.ids, dtype=mx.int32)
            row.feed = mx.array(row.ids[-1:], dtype=mx.int32)
            self._rows.append(row)

    def _prefill_chunk(self, row: _Row) -> None:
        # Same chunk boundaries as generate_step: prefill_chunk tokens at a time from the first
        # uncached one, stopping before the last prompt token (a decode step feeds that one).
        end = min(row.fed + self.prefill_chunk, len(row.ids) - 1)
        chunk = mx.array(row.ids[row.fed : end], dtype=mx.int32)
        self.model(chunk[None], cache=row.cache)
        mx.eval([c.state for c in row.cache])
        row.fed = end

    def _launch(self, rows: list[_Row]) -> list[tuple[_Row, mx.array, mx.array]]:
        """Queue one forward pass for `rows` and their sampling; returns (row, token, logprobs)."""
        self.peak_rows = max(self.peak_rows, len(rows))
        inputs = mx.concatenate([r.feed for r in rows])[:, None]  # (B, 1)
        logits = self._forward(inputs, [r.cache for r in rows])  # (B, V)
        picks = []
        for i, row in enumerate(rows):
            lg = logits[i : i + 1]  # (1, V): the same ops generate_step runs on its (1, V)
            for p in row.procs:
                lg = p(row.history, lg)
            logprobs = log_softmax(lg)
            y = row.sampler(logprobs)  # (1,)
            picks.append((row, y, logprobs[0]))
            row.feed = y
            row.produced += 1
            if row.procs:
                row.history = mx.concatenate([row.history, y])
        mx.async_eval([a for _, y, lp in picks for a in (y, lp)])
        return picks

    def _forward(self, inputs: mx.array, caches: list[list]) -> mx.array:
        """Logits (B, V) of one new token per row; row b attends over its own `caches[b]`."""
        if len(caches) == 1:
            # one row: the model's own forward, which on the CPU is the fused decode layer
            # (engine/layers/fused.py) — the same kernels and routines per row, so the same bits
            return self.model(inputs, cache=caches[0])[:, -1, :]
        inner = self.model.model
        h = inner.embed_tokens(inputs)  # (B, 1, hidden)
        # Each row's mask as LlamaModel makes it from the row's offset (None for one new token
        # unless a sliding window has filled).
        masks = [
            create_attention_mask(h[b : b + 1], c[0], self.window) for b, c in enumerate(caches)
        ]
        for i, layer in enumerate(inner.layers):
            rows = [c[i] for c in caches]
            h = h + _attend_rows(layer.self_attn, layer.input_layernorm(h), rows, masks)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = inner.norm(h)
        if "lm_head" in self.model:
            return self.model.lm_head(h)[:, -1, :]
        return inner.embed_tokens.as_linear(h)[:, -1, :]

    # --- events, as stream_generate makes them ---------------------------------------------

    def _emit(self, row: _Row, token: int, logprobs: mx.array, out: list) -> None:
        params, stats = row.params, row.stats
        extra = (
            token_logprobs(self.tokenizer, token, logprobs, params.logprobs)
            if params.logprobs is not None
            else {}
        )
        if row.t_first is None:
            row.t_first = time.perf_counter()
        if row.cancel is not None and row.cancel.is_set():
            self._finish(row, "cancelled", out, flush_only=True)
            return
        stats.generated_tokens += 1
        if token in self.eos:
            self._finish(row, "stop", out)
            return
        row.detok.add_token(token)
        text, stopped = row.scanner.feed(row.detok.last_segment)
        out.append((row.uid, Event(text=text, token_id=token, **extra)))
        row.generated.append(token)
        if stopped:
            self._leave(row)
            self._finish_event(row, "stop", "", out)
            return
        if stats.generated_tokens >= row.limit:
            self._finish(row, row.limit_reason, out)

    def _finish(self, row: _Row, reason: str, out: list, flush_only: bool = False) -> None:
        if flush_only:
            tail = row.scanner.flush()
        else:
            row.detok.finalize()
            tail, stopped = row.scanner.feed(row.detok.last_segment)
            if stopped:
                reason = "stop"
            else:
                tail += row.scanner.flush()
        self._leave(row)
        self._finish_event(row, reason, tail, out)

    def _leave(self, row: _Row) -> None:
        row.done = True
        if row in self._rows:
            self._rows.remove(row)
        if self.prefix_cache is not None and row.cache is not None:
            self.prefix_cache.put(row.ids + row.generated, row.cache)
        row.cache = None

    def _finish_event(self, row: _Row, reason: str, tail: str, out: list) -> None:
        stats = row.stats
        t_end = time.perf_counter()
        stats.finish_reason = reason
        stats.total_s = t_end - row.t0
        if row.t_first is not None:
            stats.ttft_s = row.t_first - row.t0
            stats.prefill_tps = (len(row.ids) - row.num_cached) / max(stats.ttft_s, 1e-9)
            if stats.generated_tokens > 1:
                stats.decode_tps = (stats.generated_tokens - 1) / max(t_end - row.t_first, 1e-9)
        stats.peak_memory_bytes = int(mx.get_peak_memory())
        out.append((row.uid, Event(text=tail, token_id=None, done=True, stats=stats)))


def _attend_rows(attn: Any, x: mx.array, caches: list, masks: list) -> mx.array:
    """llama `Attention` for B rows of one new token each, row b against `caches[b]`.

    Projections and RoPE run on all rows at once; the cache update and attention run per row
    with exactly the shapes a lone request has, so each row's numbers are the lone request's.
    """
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)  # (B, L, H, D)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    if "q_norm" in attn:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
    if B > 1 and getattr(attn.rope, "rope_type", None) != "dynamic":
        # One RoPE call for all rows, each at its own offset (bit-identical to per-row calls;
        # "dynamic" NTK needs one int offset to pick its base).
        offsets = mx.array([c.offset for c in caches], dtype=mx.int32)
        q, k = attn.rope(q, offsets), attn.rope(k, offsets)
    elif B == 1:
        q, k = attn.rope(q, caches[0].offset), attn.rope(k, caches[0].offset)
    else:
        q = mx.concatenate([attn.rope(q[b : b + 1], c.offset) for b, c in enumerate(caches)])
        k = mx.concatenate([attn.rope(k[b : b + 1], c.offset) for b, c in enumerate(caches)])
    outs = []
    for b, (cache, mask) in enumerate(zip(caches, masks)):
        kb, vb = cache.update_and_fetch(k[b : b + 1], v[b : b + 1])
        outs.append(scaled_dot_product_attention(q[b : b + 1], kb, vb, attn.scale, mask))
    out = mx.concatenate(outs, axis=0) if B > 1 else outs[0]  # (B, H, L, D)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

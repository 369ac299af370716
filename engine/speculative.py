"""Speculative decoding: a small draft model proposes tokens, the target model verifies them.

Each round the draft (same tokenizer, its own cache) proposes k tokens one at a time; the
target then reads its pending token plus all k proposals in ONE forward pass, which gives its
distribution at k+1 positions. Proposals are accepted left to right:

- greedy (temperature 0): while the proposal equals the target's argmax. The first mismatch is
  replaced by the target's argmax, so the output is exactly the target's greedy output;
- sampling: proposal d (drawn from the draft's q) is kept with probability min(1, p(d)/q(d));
  the first rejected one is replaced by a draw from norm(max(0, p - q)). This is the standard
  rejection rule (Leviathan et al. 2023, Chen et al. 2023): every emitted token is distributed
  exactly as the target's sampling distribution p (after logits processors, temperature,
  top-k/top-p/min-p).

When all k are accepted the target's last position gives one bonus token for free. Rejected
positions are trimmed from both caches before any token of the round is handed out, so a
cache always holds exactly the emitted history (the prefix cache relies on that).

The round is queued lazily (draft steps with `mx.async_eval`, then the verify pass) and read
back with one host sync. This module knows nothing of text, stop strings or stats beyond
`DraftCounts`: `engine.generate.stream_generate(..., draft=)` wraps it like `generate_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from engine.blas import use_blas_prefill
from engine.errors import LatentError
from engine.quant.cpu import log_softmax
from engine.sampling import SamplingParams, filter_logits, make_logits_processors

DEFAULT_NUM_DRAFT = 4
MAX_NUM_DRAFT = 32
_SAMPLE_IDS = 256  # token ids compared between the two vocabularies


@dataclass
class DraftCounts:
    """Running totals of one speculative stream (read by stream_generate for its stats)."""

    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, kept
    rounds: int = 0  # target verify passes
    first_emitted: int = 0  # tokens handed out by the first round (they arrive together)


# --- the draft must speak the target's vocabulary ---------------------------------------------


def _name(loaded: Any) -> str:
    info = getattr(loaded, "info", None)
    return str(getattr(info, "name", None) or getattr(loaded, "path", None) or "model")


def check_draft(loaded: Any, draft: Any) -> None:
    """Raise `LatentError` unless `draft` can propose tokens for `loaded` (same tokenizer)."""
    tok, dtok = getattr(loaded, "tokenizer", None), getattr(draft, "tokenizer", None)
    if getattr(draft, "model", None) is None:
        raise LatentError(f"draft {_name(draft)}: not a loaded model")
    if dtok is None:
        raise LatentError(f"draft {_name(draft)}: has no tokenizer, so its ids cannot be checked")
    if tok is None or tok is dtok:
        return
    n, dn = getattr(tok, "vocab_size", None), getattr(dtok, "vocab_size", None)
    if n != dn:
        raise LatentError(
            f"draft {_name(draft)} has a vocabulary of {dn} tokens but {_name(loaded)} has {n}: "
            "speculative decoding needs the same tokenizer"
        )
    if not (hasattr(tok, "id_to_token") and hasattr(dtok, "id_to_token")):
        return
    ids = set(range(0, n, max(1, n // _SAMPLE_IDS))) | {n - 1}
    for attr in ("bos_id", "eos_id", "unk_id", "pad_id"):
        ids.add(getattr(tok, attr, None))
    ids |= set(getattr(tok, "eos_ids", None) or ())
    for i in sorted(x for x in ids if isinstance(x, int) and 0 <= x < n):
        a, b = tok.id_to_token(i), dtok.id_to_token(i)
        if a != b:
            raise LatentError(
                f"draft {_name(draft)}: token {i} is {b!r} but {_name(loaded)} has {a!r}: "
                "speculative decoding needs the same tokenizer"
            )


def check_num_draft(num_draft: Any) -> int:
    """`num_draft` as an int, or `LatentError` when it is outside 1..MAX_NUM_DRAFT."""
    try:
        n = int(num_draft)
    except (TypeError, ValueError):
        n = 0
    if n != num_draft or not 1 <= n <= MAX_NUM_DRAFT:
        raise LatentError(
            f"num_draft={num_draft!r}: must be a whole number from 1 to {MAX_NUM_DRAFT}"
        )
    return n


# --- the decoding loop ------------------------------------------------------------------------


def _fit_width(logits: mx.array, width: int) -> mx.array:
    """Draft logits (..., Vd) cut or padded with -inf to the target's width (padded vocabularies)."""
    vd = logits.shape[-1]
    if vd == width:
        return logits
    if vd > width:
        return logits[..., :width]
    pad = mx.full((*logits.shape[:-1], width - vd), -float("inf"), dtype=logits.dtype)
    return mx.concatenate([logits, pad], axis=-1)


def _prefill(model, ids: mx.array, cache: list, chunk: int, cancel) -> bool:
    """Feed `ids` into `cache` chunk by chunk (cache only evaluated); False if cancelled."""
    pos, n = 0, ids.size
    while pos < n:
        take = min(chunk, n - pos)
        model(ids[pos : pos + take][None], cache=cache)
        mx.eval([c.state for c in cache])
        pos += take
        if cancel is not None and cancel.is_set():
            return False
    return True


class _Rng:
    """A private seeded key split per draw (None: MLX's global generator)."""

    def __init__(self, seed: int | None) -> None:
        self.key = mx.random.key(seed % 2**64) if seed is not None else None

    def __call__(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


def speculative_generate_step(
    model: Callable,
    draft_model: Callable,
    prompt_ids: Sequence[int] | mx.array,
    cache: list,
    draft_cache: list,
    params: SamplingParams | None = None,
    *,
    num_draft: int = DEFAULT_NUM_DRAFT,
    prefill_chunk: int = 512,
    num_cached: int = 0,
    draft_num_cached: int = 0,
    max_tokens: int | None = None,
    cancel: Any = None,
    counts: DraftCounts | None = None,
    draft_context: int | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token_id, target logprobs (vocab,))` like `generate_step`, k+1 at most per round.

    `cache` holds the first `num_cached` prompt tokens, `draft_cache` the first
    `draft_num_cached`. `params` gives the sampling rule and logits processors (applied to the
    draft's logits as well, so it proposes what the target would pick). Never more than
    `max_tokens` tokens are produced and the draft never reads past `draft_context` positions.
    """
    params = params or SamplingParams(temperature=0.0)
    num_draft = check_num_draft(num_draft)
    ids = (
        mx.array(prompt_ids, dtype=mx.int32) if not isinstance(prompt_ids, mx.array) else prompt_ids
    )
    n_total = ids.size
    if num_cached >= n_total or draft_num_cached >= n_total:
        raise ValueError(f"num_cached leaves no prompt token to feed (prompt has {n_total})")
    for m in (model, draft_model):
        use_blas_prefill(m)  # CPU: our kernels + OpenBLAS sgemm for many rows (idempotent)
    counts = counts if counts is not None else DraftCounts()
    greedy = params.temperature <= 0.0
    procs = make_logits_processors(params)
    rng = _Rng(params.seed)
    width = _vocab_width(model)  # the target's; draft logits are cut/padded to it

    # Both caches take the prompt but its last token, which starts the first round.
    if not _prefill(model, ids[num_cached:-1], cache, prefill_chunk, cancel):
        return
    if not _prefill(draft_model, ids[draft_num_cached:-1], draft_cache, prefill_chunk, cancel):
        return

    history = ids  # every token so far (what logits processors see)
    y = int(ids[-1].item())  # the newest token, not yet in the target's cache
    pending = [y]  # tokens not yet in the draft's cache (1, or 2 after a full accept)
    draft_pos = n_total - 1  # positions the draft cache holds
    produced = 0

    def process(logits: mx.array, hist: mx.array) -> mx.array:
        for p in procs:
            logits = p(hist, logits)
        return logits

    def dist(logprobs: mx.array) -> tuple[mx.array, mx.array]:
        """Sampling logits (filtered) and probabilities (..., V) in float32."""
        x = filter_logits(
            logprobs.astype(mx.float32),
            params.temperature,
            params.top_k,
            params.top_p,
            params.min_p,
        )
        return x, mx.softmax(x, axis=-1)

    while max_tokens is None or produced < max_tokens:
        k = num_draft
        if max_tokens is not None:
            k = min(k, max_tokens - produced - 1)  # the round emits up to k+1 tokens
        if draft_context is not None:
            k = min(k, draft_context - draft_pos - len(pending) + 1)
        k = max(k, 0)

        # 1. The draft proposes k tokens, one forward pass each (queued, not waited on).
        drafts: list[mx.array] = []  # each (1,)
        qs: list[mx.array] = []  # each (1, V): the distribution each proposal was drawn from
        inp = mx.array(pending, dtype=mx.int32)
        for _ in range(k):
            logits = draft_model(inp[None], cache=draft_cache)[:, -1, :]  # (1, Vd)
            logits = _fit_width(logits, width or logits.shape[-1])
            if procs:
                logits = process(logits, mx.concatenate([history, *drafts]))
            if greedy:
                d = mx.argmax(logits, axis=-1)
            else:
                logprobs = log_softmax(logits)
                x, q = dist(logprobs)
                d = mx.random.categorical(x, axis=-1, key=rng())
                qs.append(q)
            d = d.astype(mx.int32)
            drafts.append(d)
            mx.async_eval(d)
            inp = d

        # 2. The target reads y and all k proposals in one pass: k+1 next-token distributions.
        tin = mx.concatenate([mx.array([y], dtype=mx.int32), *drafts])  # (k+1,)
        logits = model(tin[None], cache=cache)[0]  # (k+1, V)
        if qs and qs[0].shape[-1] != logits.shape[-1]:
            raise LatentError(
                f"the target's logits have {logits.shape[-1]} columns but its config says "
                f"{qs[0].shape[-1]}: cannot sample speculatively"
            )
        width = logits.shape[-1]
        if procs:
            rows = [
                process(logits[j : j + 1], mx.concatenate([history, *drafts[:j]]))
                for j in range(k + 1)
            ]
            logits = mx.concatenate(rows, axis=0)
        logprobs = log_softmax(logits)  # (k+1, V)
        dvec = mx.concatenate(drafts) if drafts else mx.zeros((0,), dtype=mx.int32)  # (k,)

        # 3. Acceptance, all positions at once; the host only finds the first rejection.
        if greedy:
            choice = mx.argmax(logprobs, axis=-1)  # (k+1,)
            accept = choice[:k] == dvec
        else:
            _, p = dist(logprobs)  # (k+1, V)
            if k:
                q = mx.concatenate(qs, axis=0)  # (k, V)
                pd = mx.take_along_axis(p[:k], dvec[:, None], axis=-1)[:, 0]
                qd = mx.take_along_axis(q, dvec[:, None], axis=-1)[:, 0]
                u = mx.random.uniform(shape=(k,), key=rng())
                accept = u * qd < pd  # u < p/q, with q(d) > 0 since d was drawn from q
                resid = mx.maximum(p[:k] - q, 0.0)
                # p == q leaves no residual mass, but then rejection has probability 0.
                resid = mx.where(resid.sum(axis=-1, keepdims=True) > 0, resid, p[:k])
                resid = mx.concatenate([resid, p[k:]], axis=0)  # bonus row: plain target draw
            else:
                accept, resid = mx.zeros((0,), dtype=mx.bool_), p
            choice = mx.random.categorical(mx.log(resid), axis=-1, key=rng())  # (k+1,)
        mx.eval(choice, accept, dvec, logprobs)
        ok = accept.tolist()
        a = 0
        while a < k and ok[a]:
            a += 1
        emitted = dvec.tolist()[:a] + [int(choice[a].item())]

        # 4. Forget what was not accepted: the target keeps y, d1..da; the draft, which never
        # read dk, keeps y, d1..da too (or lacks only dk when all were accepted).
        for c in cache:
            c.trim(k - a)
        if k:
            for c in draft_cache:
                c.trim(max(k - 1 - a, 0))
            draft_pos += len(pending) + min(a, k - 1)
            pending = ([emitted[-2]] if a == k else []) + [emitted[-1]]
        else:
            pending = pending + emitted
        counts.proposed += k
        counts.accepted += a
        counts.rounds += 1
        if counts.rounds == 1:
            counts.first_emitted = len(emitted)
        if procs:
            history = mx.concatenate([history, mx.array(emitted, dtype=mx.int32)])
        y = emitted[-1]

        for j, t in enumerate(emitted):
            produced += 1
            yield t, logprobs[j]
        if cancel is not None and cancel.is_set():
            return


def _vocab_width(model: Any) -> int | None:
    """The width of the target's logits, from its config (None: learnt at the first pass)."""
    v = getattr(getattr(model, "args", None), "vocab_size", None)
    return int(v) if v else None

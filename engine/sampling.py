"""Sampling: turning one position's logits into the next token id.

`SamplingParams` holds every knob a front end can set. `make_sampler` returns a function from
log-probabilities `(1, vocab)` to a token `(1,)` (greedy at temperature 0; temperature, then
top-k, top-p and min-p filtering in Hugging Face's order; a private seeded key so the same seed
gives the same tokens). `make_logits_processors` returns the rules that rewrite logits from the
tokens seen so far: repetition penalty (HF semantics), presence/frequency penalty (OpenAI
semantics) and a logit bias.

Everything here stays lazy MLX: no host syncs, so the generation loop can queue the next step
while the current token is detokenized. This module knows nothing of models, caches or text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 512
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Report each generated token's log-probability (after the logits processors) and this many
    # top alternatives; None reports nothing and costs nothing.
    logprobs: int | None = None

    def replace(self, **changes) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def filter_logits(
    logits: mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> mx.array:
    """Scaled logits `(B, V)` with the tokens top-k/top-p/min-p rule out set to -inf.

    Order and tie rules follow transformers' warpers: temperature, then top-k (keep the k
    largest), then top-p (keep the smallest set whose probability reaches p, always at least
    one), then min-p (keep tokens with probability >= min_p x the top probability).
    """
    neg_inf = mx.array(-float("inf"), dtype=logits.dtype)
    x = logits / temperature if temperature not in (0.0, 1.0) else logits
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        # The k-th largest value is the threshold; ties with it are kept, as in HF.
        kth = mx.sort(x, axis=-1)[..., vocab - top_k : vocab - top_k + 1]
        x = mx.where(x < kth, neg_inf, x)
    if 0.0 < top_p < 1.0:
        order = mx.argsort(x, axis=-1)  # ascending
        sorted_x = mx.take_along_axis(x, order, axis=-1)
        cum = mx.cumsum(mx.softmax(sorted_x, axis=-1), axis=-1)
        # Drop the low tail whose cumulative mass is <= 1 - p; the top token always stays.
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[..., -1] = False
        # Scatter the sorted mask back to vocabulary order.
        inverse = mx.argsort(order, axis=-1)
        drop = mx.take_along_axis(drop_sorted, inverse, axis=-1)
        x = mx.where(drop, neg_inf, x)
    if min_p > 0.0:
        probs = mx.softmax(x, axis=-1)
        top = mx.max(probs, axis=-1, keepdims=True)
        x = mx.where(probs < min_p * top, neg_inf, x)
    return x


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A function `(logprobs (B, V)) -> tokens (B,)`; greedy when temperature <= 0.

    With a seed the sampler owns its own key (split once per call), so a given seed reproduces
    the same tokens regardless of what else uses `mx.random`.
    """
    if temperature <= 0.0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    # Any integer is a valid seed (OpenAI clients send int64, negatives too); MLX keys are uint64.
    state = {"key": mx.random.key(seed % 2**64) if seed is not None else None}

    def sample(logprobs: mx.array) -> mx.array:
        x = filter_logits(logprobs, temperature, top_k, top_p, min_p)
        if state["key"] is None:
            return mx.random.categorical(x, axis=-1)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(x, axis=-1, key=sub)

    return sample


def repetition_penalty_processor(penalty: float, context: int = 64) -> LogitsProcessor:
    """HF rule for tokens in the last `context` ids: logit < 0 → logit·p, else logit / p."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context:] if context > 0 else tokens
        sel = logits[:, recent]
        sel = mx.where(sel < 0, sel * penalty, sel / penalty)
        logits[:, recent] = sel
        return logits

    return apply


def presence_frequency_processor(
    presence: float, frequency: float, context: int = 64
) -> LogitsProcessor:
    """OpenAI rule: logit[j] -= count[j]·frequency + (count[j] > 0)·presence over recent ids."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context:] if context > 0 else tokens
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[recent].add(1.0)
        penalty = counts * frequency + (counts > 0).astype(logits.dtype) * presence
        return logits - penalty

    return apply


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed value to chosen token ids (OpenAI's `logit_bias`)."""
    ids = mx.array([int(k) for k in bias], dtype=mx.int32)
    values = mx.array([float(v) for v in bias.values()], dtype=mx.float32)

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, ids] = logits[:, ids] + values.astype(logits.dtype)
        return logits

    return apply


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors `params` asks for, in a fixed order: bias, repetition, presence/frequency."""
    procs: list[LogitsProcessor] = []
    if params.logit_bias:
        procs.append(logit_bias_processor(params.logit_bias))
    if params.repetition_penalty and params.repetition_penalty != 1.0:
        procs.append(
            repetition_penalty_processor(params.repetition_penalty, params.repetition_context)
        )
    if params.presence_penalty or params.frequency_penalty:
        procs.append(
            presence_frequency_processor(
                params.presence_penalty, params.frequency_penalty, params.repetition_context
            )
        )
    return procs


def sampler_for(params: SamplingParams) -> Sampler:
    return make_sampler(params.temperature, params.top_k, params.top_p, params.min_p, params.seed)

"""Pipeline-parallel inference: one model's decoder layers split across the ranks of a ring.

Rank r holds a contiguous run of layers, sized by its share of the weight bytes (`split_layers`),
and loads only those tensors (plus the embedding on the first rank, the final norm and output head
on the last; a tied embedding is also kept by the last rank as its head). `mx.load` is lazy, so the
tensors of other ranks' layers are never read. Data moves along the ring only between neighbours:
a small int32 header and the hidden states go r -> r+1, the logits come back from the last rank
to rank 0 (its ring neighbour).

Rank 0 holds a `PipelineModel` that looks like any engine model (`__call__(inputs, cache)`,
`make_cache`, `layers`, `args`), so `generate_step`, `Engine` and the server run on it unchanged;
the other ranks sit in `serve_forever()`. Every rank keeps its own layers' KV caches: the header
carries rank 0's cache key and offset, and a worker resets, trims or forks its caches to match
(rank 0's Engine keeps one prefix-cache entry for this). `close()` sends STOP.

Supported: models whose body is `model.embed_tokens / model.layers / model.norm` with an optional
`lm_head` (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, deepseek_v2, deepseek_v3). Explicit
padding masks (left-padded batches) are not. Experts are split by layer, not across ranks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.distributed import DistributedError, default_timeout, guard
from engine.layers.attention import create_attention_mask

FORWARD, STOP = 1, 2
_HDR = 8  # cmd, B, L, offset, use_cache, full_logits, key_hi, key_lo
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layers(
    layer_bytes: list[int], shares: list[float], first_bytes: int = 0, last_bytes: int = 0
) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, each rank's bytes close to its share.

    `first_bytes`/`last_bytes` are what the first/last rank hold besides layers (embedding, head).
    Every rank gets at least one layer.
    """
    n, L = len(shares), len(layer_bytes)
    if n > L:
        raise DistributedError(f"{n} processes but the model has only {L} layers")
    total = first_bytes + sum(layer_bytes) + last_bytes
    cum = [first_bytes]
    for b in layer_bytes:
        cum.append(cum[-1] + b)  # cum[i]: bytes of the first rank holding layers [0, i)
    cuts, acc = [0], 0.0
    for k in range(1, n):
        acc += shares[k - 1] / sum(shares)
        target = acc * total
        lo, hi = cuts[-1] + 1, L - (n - k)
        best = min(range(lo, hi + 1), key=lambda i: abs(cum[i] - target))
        cuts.append(best)
    cuts.append(L)
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _head_keys(weights: dict[str, Any], tied: bool) -> tuple[set[str], set[str]]:
    """(keys the first rank needs besides layers, keys the last rank needs)."""
    first = {k for k in weights if k.startswith("model.embed_tokens.")}
    last = {k for k in weights if k.startswith(("model.norm.", "lm_head."))}
    if tied:
        last |= first
    return first, last


class PipelineModel(nn.Module):
    """One rank's stage of a pipelined model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        group: mx.distributed.Group,
        start: int,
        end: int,
        dtype: mx.Dtype,
        timeout: float | None = None,
    ):
        super().__init__()
        self.stage = model  # the architecture's Model, pruned to this rank's parts
        self.args = model.args
        self.model_type = model.model_type
        self._group, self._start, self._end = group, start, end
        self._dtype = dtype
        self._timeout = default_timeout() if timeout is None else timeout
        self._caches: dict[int, list] = {}  # worker: rank 0's cache key -> this stage's caches
        self._last_key: int | None = None
        self._next_key = 0  # rank 0: cache keys handed out so far
        self.full_logits = True  # False: only the last position's logits travel back
        self.closed = False

    # -- what generation sees ----------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._group.rank()

    @property
    def size(self) -> int:
        return self._group.size()

    @property
    def layer_range(self) -> tuple[int, int]:
        return self._start, self._end

    @property
    def layers(self) -> list:
        return self.stage.model.layers

    @property
    def supports_kv_bits(self) -> bool:
        return bool(getattr(self.stage, "supports_kv_bits", False))

    def make_cache(self, kv_bits: int | None = None) -> list:
        return self.stage.make_cache(kv_bits)

    def __call__(self, inputs: mx.array, cache: list | None = None, mask: Any = None) -> mx.array:
        if self.rank != 0:
            raise DistributedError("only rank 0 drives the pipeline")
        if self.closed:
            raise DistributedError("the pipeline was closed")
        if mask is not None and not isinstance(mask, str):
            raise DistributedError(
                "pipeline inference does not take padding masks (one prompt at a time)"
            )
        B, L = inputs.shape
        offset = cache[0].offset if cache is not None else 0
        key = self._cache_key(cache) if cache is not None else 0
        full = 1 if (self.full_logits or L == 1) else 0
        hdr = mx.array(
            [FORWARD, B, L, offset, cache is not None, full, key >> 31, key & 0x7FFFFFFF],
            dtype=mx.int32,
        )
        h = self._run_layers(self.stage.model.embed_tokens(inputs), cache)
        self._send(hdr, h)
        out_len = L if full else 1
        vocab = self.args.vocab_size
        with guard(self._timeout, f"logits from rank {self.size - 1}"):
            logits = mx.distributed.recv(
                (B, out_len, vocab), self._dtype, self.size - 1, group=self._group
            )
            mx.eval(logits)
        return logits

    def _cache_key(self, cache: list) -> int:
        """A number never reused for another cache list (ids of freed objects are)."""
        key = getattr(cache[0], "_pipeline_key", None)
        if key is None:
            self._next_key += 1
            key = self._next_key
            cache[0]._pipeline_key = key
        return key

    def close(self) -> None:
        """Tell the other ranks to stop (rank 0; idempotent)."""
        if self.rank == 0 and not self.closed:
            self.closed = True
            hdr = mx.array([STOP] + [0] * (_HDR - 1), dtype=mx.int32)
            try:  # best effort: after a lost peer there is nobody to tell
                with guard(min(self._timeout, 10.0), "rank 1 to take the stop message"):
                    mx.eval(mx.distributed.send(hdr, 1, group=self._group))
            except DistributedError:
                pass

    # -- the stages ----------------------------------------------------------------------------

    def _run_layers(self, h: mx.array, cache: list | None) -> mx.array:
        inner = self.stage.model
        c = cache if cache is not None else [None] * len(inner.layers)
        mask = create_attention_mask(h, c[0], getattr(inner, "_window", None))
        for layer, lc in zip(inner.layers, c):
            h = layer(h, mask, lc)
        return h.astype(self._dtype)

    def _head(self, h: mx.array) -> mx.array:
        h = self.stage.model.norm(h)
        if "lm_head" in self.stage:
            return self.stage.lm_head(h)
        return self.stage.model.embed_tokens.as_linear(h)

    def _send(self, hdr: mx.array, h: mx.array) -> None:
        dst = self.rank + 1
        with guard(self._timeout, f"rank {dst} to take the activations"):
            mx.eval(mx.distributed.send(hdr, dst, group=self._group))
            mx.eval(mx.distributed.send(h, dst, group=self._group))

    def _worker_cache(self, key: int, offset: int) -> list:
        caches = self._caches.get(key)
        if caches is None or offset == 0:
            caches = self.make_cache()
            if offset:  # rank 0 forked its one prefix-cache entry: fork ours alike
                src = self._caches.get(self._last_key) if self._last_key is not None else None
                if src is None or src[0].offset < offset:
                    raise DistributedError(
                        f"rank {self.rank}: no cached prefix of {offset} tokens to continue"
                    )
                for dst, s in zip(caches, src):
                    dst.state, dst.meta_state = s.state, s.meta_state
        if caches[0].offset > offset:
            for c in caches:
                c.trim(c.offset - offset)
        elif caches[0].offset < offset:
            raise DistributedError(
                f"rank {self.rank}: cache holds {caches[0].offset} tokens, rank 0 has {offset}"
            )
        self._caches[key] = caches
        self._last_key = key
        for k in [k for k in self._caches if k != key][:-3]:  # keep a few conversations
            del self._caches[k]
        return caches

    def serve_forever(self) -> None:
        """Ranks 1..n-1: run forward passes until rank 0 says STOP (or goes away)."""
        me, n = self.rank, self.size
        D = self.args.hidden_size
        while True:
            # idle: no watchdog (rank 0's user may be thinking); a closed socket still raises
            with guard(None, f"a request from rank {me - 1}"):
                hdr = mx.distributed.recv((_HDR,), mx.int32, me - 1, group=self._group)
                mx.eval(hdr)
            cmd, B, L, offset, use_cache, full, hi, lo = hdr.tolist()
            if cmd == STOP:
                if me < n - 1:
                    with guard(self._timeout, f"rank {me + 1} to take the stop message"):
                        mx.eval(mx.distributed.send(hdr, me + 1, group=self._group))
                return
            with guard(self._timeout, f"activations from rank {me - 1}"):
                h = mx.distributed.recv((B, L, D), self._dtype, me - 1, group=self._group)
                mx.eval(h)
            cache = self._worker_cache((hi << 31) | lo, offset) if use_cache else None
            h = self._run_layers(h, cache)
            if me < n - 1:
                self._send(hdr, h)
                continue
            logits = self._head(h if full else h[:, -1:, :]).astype(self._dtype)
            with guard(self._timeout, "rank 0 to take the logits"):
                mx.eval(mx.distributed.send(logits, 0, group=self._group))


# --- loading one stage --------------------------------------------------------------------------


def _stage_weights(
    weights: dict[str, mx.array], start: int, end: int, keep: set[str]
) -> dict[str, mx.array]:
    out = {}
    for k, v in weights.items():
        m = _LAYER.match(k)
        if m:
            i = int(m.group(1))
            if start <= i < end:
                out[f"model.layers.{i - start}.{m.group(2)}"] = v
        elif k in keep:
            out[k] = v
    return out


def load_stage(
    path_or_repo: str | Path,
    group: mx.distributed.Group,
    shares: list[float] | None = None,
    *,
    dtype: str | mx.Dtype | None = None,
    timeout: float | None = None,
):
    """This rank's `LoadedModel` (its `.model` a `PipelineModel`) of a model split over `group`."""
    from engine.config import load_hf_config
    from engine.device import cast_weights, compute_dtype, dtype_name, parse_dtype
    from engine.errors import LatentError, ModelLoadError
    from engine.loading import (
        LoadedModel,
        ModelInfo,
        _check_weights,
        _load_tokenizer,
        _safetensors_files,
        count_params,
        load_gguf,
        load_safetensors,
        resolve_path,
    )
    from engine.models import get_model_classes
    from engine.quant import prepare_model

    path = resolve_path(path_or_repo)
    cdtype = parse_dtype(dtype) or compute_dtype()
    gguf = path if path.is_file() else None
    if gguf is None and not any(path.glob("*.safetensors")):
        found = sorted(path.glob("*.gguf"))
        gguf = found[0] if len(found) == 1 else None
    if gguf is not None:
        weights, config = load_gguf(gguf)  # GGUF tensors are read whole, then dropped below
        where = gguf
    else:
        config = load_hf_config(path)
        weights = load_safetensors(_safetensors_files(path))  # lazy: nothing is read yet
        where = path
    Model, ModelArgs = get_model_classes(config.get("model_type", ""))
    model = Model(ModelArgs.from_dict(config))
    if not all(
        hasattr(model, "model") and k in model.model for k in ("embed_tokens", "layers", "norm")
    ):
        raise DistributedError(f"{where}: model_type {config['model_type']!r} cannot be pipelined")
    weights = model.sanitize(weights)

    n_layers = len(model.model.layers)
    layer_bytes = [0] * n_layers
    for k, v in weights.items():
        m = _LAYER.match(k)
        if m and int(m.group(1)) < n_layers:
            layer_bytes[int(m.group(1))] += v.nbytes
    tied = "lm_head" not in model
    first_keys, last_keys = _head_keys(weights, tied)
    me, n = group.rank(), group.size()
    ranges = split_layers(
        layer_bytes,
        shares or [1.0] * n,
        sum(weights[k].nbytes for k in first_keys),
        sum(weights[k].nbytes for k in last_keys),
    )  # a tied head is a 2nd copy
    start, end = ranges[me]
    keep = (first_keys if me == 0 else set()) | (last_keys if me == n - 1 else set())

    inner = model.model
    inner.layers = inner.layers[start:end]
    if not any(k.startswith("model.embed_tokens.") for k in keep):
        inner.pop("embed_tokens")
    if me != n - 1:
        inner.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    weights = _stage_weights(weights, start, end, keep)
    try:
        prepare_model(model, weights, config)
    except LatentError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    _check_weights(model, weights, where)
    model.load_weights(list(cast_weights(weights, cdtype).items()), strict=True)
    del weights
    mx.eval(model.parameters())
    model.eval()

    stage = PipelineModel(model, group, start, end, cdtype, timeout)
    params = dict(tree_flatten(stage.parameters()))
    info = ModelInfo(
        name=where.stem if gguf is not None else where.name,
        path=str(where),
        model_type=config["model_type"],
        n_params=count_params(stage),
        weight_bytes=sum(v.nbytes for v in params.values()),
        context_length=int(config.get("max_position_embeddings") or 2048),
        quantization=None,
        adapter=None,
        dtype=dtype_name(cdtype),
    )
    tokenizer = _load_tokenizer(where, gguf is not None, config) if me == 0 else None
    return LoadedModel(stage, tokenizer, config, where, info, None)


def run_pipeline(
    path_or_repo: str | Path,
    group: mx.distributed.Group,
    front_end,
    shares: list[float] | None = None,
    **kw: Any,
):
    """Load this rank's stage; rank 0 calls `front_end(loaded)` and returns its result (then
    stops the others), the other ranks serve until then and return None."""
    loaded = load_stage(path_or_repo, group, shares, **kw)
    stage: PipelineModel = loaded.model
    if group.rank() != 0:
        stage.serve_forever()
        return None
    try:
        return front_end(loaded)
    finally:
        stage.close()

"""The inspector: what a loaded model stores, what it computes on one prompt, and a math check.

- `storage(loaded)`: every tensor (name, shape, format, bytes, part), totals by part
  (embeddings, attention, norms, mlp, experts, router, lora, other), attention bytes per head,
  and the KV-cache bytes per token measured on the model's own cache beside what the same model
  would need with full per-head K and V (MHA in the compute dtype).
- `look(loaded, prompt)`: one prompt looked at — attention probabilities per layer (H, L, S),
  router choices per MoE layer, the residual-stream norm per layer and position, and the top-k
  next-token probabilities. Captures are made only inside this call (temporary taps, removed in
  a `finally`), so ordinary generation pays nothing.
- `check_math(loaded, prompt)`: the engine's residual stream after every layer against the
  float64 numpy reference of engine/inspect_ref.py on the same (dequantized) weights; per-layer
  max abs difference, relative to the layer's magnitude, judged by a per-dtype tolerance.

How the taps work (no model file is edited): each entry of `model.layers` is wrapped for the
duration of a call by a callable that records its output; attention probabilities come from
swapping `scaled_dot_product_attention` in the engine modules that imported it for an explicit
softmax that records p and returns p·v (the same math); MLA layers are put in "materialized"
mode meanwhile, so their scores are over keys built from the latent. Not thread-safe against a
generation running on the same model at the same time (the engine serialises calls).

This module knows nothing about Qt; the GUI's Inspector view and `latent inspect` call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from engine.inspect_ref import FAMILIES, family_of, reference_forward

PARTS = ("embeddings", "attention", "norms", "mlp", "experts", "router", "lora", "other")

# Allowed max |engine − reference| / max(1, scale), per compute dtype; the scale of a residual
# state is the largest |value| the stream has held up to it, of the final norm and logits their
# own. Measured on SmolLM2-135M Q4_1 (3 prompts): float32 ≤ 1e-5, float16 ≤ 3.4e-2, bfloat16 ≤ 0.33
# (bf16 keeps 8 mantissa bits: at the stream's 2e4 outliers its spacing is 128).
# On the CPU our quantized-matvec kernel rounds activations to int16 per 32-element block
# (kernels/cpu/qmatmul.cpp): prompts of fewer than 12 tokens go through it, and there the same
# 7 prompts measured ≤ 8.1e-4 (elements sharing a block with one of the stream's outliers lose
# the most), hence "float32 (int16 matvec)".
TOLERANCE = {"float32": 1e-4, "float32 (int16 matvec)": 3e-3, "float16": 1e-1, "bfloat16": 5e-1}


# ------------------------------------------------------------------------------ storage


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    format: str  # dtype, or e.g. "affine q4 g32 (uint32)" for packed weights
    bytes: int
    part: str


@dataclass
class Storage:
    rows: list[TensorRow]
    totals: dict[str, int]  # bytes per part
    total_bytes: int
    n_layers: int
    n_heads: int
    attention_bytes_per_head: float  # attention bytes / (layers × heads)
    kv_bytes_per_token: int  # measured on the model's own cache
    kv_bytes_per_token_full: int  # same model with full per-head K and V
    kv_kind: str  # "kv", "gqa", "mla (latent)", "quantized kv", …


def part_of(name: str, ndim: int = 2) -> str:
    """Which part of the model a tensor belongs to, from its checkpoint name (and rank)."""
    n = name.lower()
    if "lora_a" in n or "lora_b" in n:
        return "lora"
    if any(s in n for s in ("embed", "wte.", "wpe.", "lm_head", "positions.")):
        return "embeddings"
    if "norm" in n or ".ln_" in n or n.startswith("ln_") or "ln_f." in n:
        return "norms"
    if any(s in n for s in (".gate.weight", "e_score_correction_bias", ".router.", "expert_gate")):
        return "router"
    if (
        "switch_mlp" in n
        or (".experts." in n and "shared" not in n)
        or ("attn" not in n and ndim == 3)
    ):
        return "experts"
    if "attn" in n or "attention" in n:
        return "attention"
    if any(s in n for s in ("mlp", "ffn", "feed_forward", "shared_expert")):
        return "mlp"
    return "other"


def _owner_formats(model: nn.Module) -> dict[str, str]:
    out = {}
    for path, m in model.named_modules():
        bits = getattr(m, "bits", None)
        if bits and "scales" in m:
            out[path] = f"{getattr(m, 'mode', 'affine')} q{bits} g{getattr(m, 'group_size', '?')}"
        elif "weight_scale_inv" in m:
            out[path] = "fp8 e4m3"
    return out


def tensor_rows(model: nn.Module) -> list[TensorRow]:
    """One row per stored tensor of `model` (packed quantized tensors as stored)."""
    owners = _owner_formats(model)
    rows = []
    for name, v in tree_flatten(model.parameters()):
        owner = name.rsplit(".", 1)[0]
        dt = str(v.dtype).replace("mlx.core.", "")
        fmt = f"{owners[owner]} ({dt})" if owner in owners else dt
        rows.append(TensorRow(name, tuple(v.shape), fmt, int(v.nbytes), part_of(name, v.ndim)))
    return rows


def _attn_dims(model: nn.Module) -> tuple[int, int, Any]:
    """(layers, query heads, first attention module)."""
    layers = model.layers
    first = layers[0]
    attn = first.get("self_attn") if "self_attn" in first else first.get("attn")
    heads = getattr(attn, "n_heads", None) or getattr(attn, "num_heads", None) or 0
    return len(layers), int(heads), attn


def _float_dtype(model: nn.Module) -> mx.Dtype:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.uint32:
            return v.dtype
    return mx.float32


def storage(loaded_or_model: Any) -> Storage:
    """What the model stores, by tensor and by part, and its KV cost per token."""
    model = getattr(loaded_or_model, "model", loaded_or_model)
    rows = tensor_rows(model)
    totals = {p: 0 for p in PARTS}
    for r in rows:
        totals[r.part] += r.bytes
    n_layers, n_heads, attn = _attn_dims(model)
    per_head = totals["attention"] / max(1, n_layers * n_heads)
    # measured: one token through the model's own cache
    cache = model.make_cache()
    mx.eval(model(mx.array([[0]], dtype=mx.int32), cache=cache))
    measured = int(sum(getattr(c, "bytes_per_token", 0) for c in cache))
    store = getattr(cache[0], "dtype", None)  # a KVCache's storage dtype (float16 on the CPU)
    item = (store or _float_dtype(model)).size
    if hasattr(attn, "q_head_dim"):  # MLA: full per-head K (nope + rope) and V
        full = n_layers * n_heads * (attn.q_head_dim + attn.v_head_dim) * item
        kind = "mla latent"
    else:
        hd = getattr(attn, "head_dim", 0)
        full = 2 * n_layers * n_heads * hd * item
        n_kv = getattr(attn, "n_kv_heads", n_heads)
        kind = "mha" if n_kv == n_heads else f"gqa ({n_kv} kv heads)"
    if type(cache[0]).__name__.startswith("Quantized"):
        kind = f"quantized {kind}"
    elif store is not None and store != _float_dtype(model):
        kind = f"{kind}, {str(store).replace('mlx.core.', '')}"
    return Storage(
        rows, totals, sum(totals.values()), n_layers, n_heads, per_head, measured, full, kind
    )


# --------------------------------------------------------------------------------- taps


class _Tap:
    """Stands in for one decoder layer: calls it and keeps its output."""

    def __init__(self, layer: Any, out: list) -> None:
        self.layer, self.out = layer, out

    def __call__(self, x, *args, **kwargs):
        if not self.out:
            self.out.append(x)  # the input of the first layer: embeddings (+ positions)
        y = self.layer(x, *args, **kwargs)
        self.out.append(y)
        return y

    def __getattr__(self, name: str):
        return getattr(self.layer, name)


@contextlib.contextmanager
def tap_layers(model: nn.Module):
    """Within the block, the yielded list receives the stream entering layer 0 and leaving each
    layer (B, L, D)."""
    layers = model.layers
    original = list(layers)
    out: list = []
    try:
        for i, layer in enumerate(original):
            layers[i] = _Tap(layer, out)
        yield out
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer


def _recording_sdpa(records: list):
    def sdpa(q, k, v, scale, mask=None):
        B, Hq, L, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        if Hkv != Hq:  # grouped-query: each K/V head serves Hq/Hkv query heads
            k = mx.repeat(k, Hq // Hkv, axis=1)
            v = mx.repeat(v, Hq // Hkv, axis=1)
        s = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale  # (B, H, L, S)
        if isinstance(mask, str):
            mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
        if mask is not None:
            if mask.dtype == mx.bool_:
                s = mx.where(mask, s, -math.inf)
            else:
                s = s + mask.astype(s.dtype)
        p = mx.softmax(s, axis=-1, precise=True)
        records.append(p)
        return (p @ v.astype(mx.float32)).astype(q.dtype)

    return sdpa


@contextlib.contextmanager
def capture_attention(model: nn.Module):
    """Within the block, the yielded list receives each attention call's probabilities (B, H, L, S),
    in layer order."""
    from engine.layers import attention as attention_module

    original = attention_module.scaled_dot_product_attention
    records: list = []
    patched = []
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if (
            name.startswith("engine.")
            and getattr(mod, "scaled_dot_product_attention", None) is original
        ):
            patched.append(mod)
    modes = []
    for _, m in model.named_modules():
        if hasattr(m, "mode") and hasattr(m, "kv_lora_rank"):
            modes.append((m, m.mode))
            m.mode = "materialized"
    fn = _recording_sdpa(records)
    try:
        for mod in patched:
            mod.scaled_dot_product_attention = fn
        yield records
    finally:
        for mod in patched:
            mod.scaled_dot_product_attention = original
        for m, mode in modes:
            m.mode = mode


# ---------------------------------------------------------------------------------- look


@dataclass
class Look:
    tokens: list[str]
    ids: list[int]
    attention: list[np.ndarray]  # per layer (H, L, L): row i = query i, columns = keys
    router: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> expert ids (L, k), weights (L, k)
    residual_norms: np.ndarray  # (n_layers + 1, L): ‖x‖₂ entering layer 0, then after each
    top_next: list[tuple[int, str, float]]  # (id, text, probability), after the last token
    notes: list[str] = field(default_factory=list)


def _ids_of(loaded: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if loaded.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        return list(loaded.tokenizer.encode(prompt))
    return [int(i) for i in prompt]


def look(
    loaded: Any,
    prompt: str | list[int],
    top_k: int = 10,
    attention: bool = True,
    router: bool = True,
) -> Look:
    """Run one prompt and keep what the inspector shows (see `Look` for the shapes)."""
    model = loaded.model
    ids = _ids_of(loaded, prompt)
    tok = loaded.tokenizer
    x = mx.array([ids], dtype=mx.int32)
    rec_router = None
    if router and hasattr(type(model), "capture"):
        from engine.layers.moe import RouterCapture

        rec_router = RouterCapture()
        model.capture = rec_router
    try:
        with (
            capture_attention(model) if attention else contextlib.nullcontext([]) as att,
            tap_layers(model) as hidden,
        ):
            logits = model(x)
            mx.eval(logits, hidden, att)
    finally:
        if rec_router is not None:
            model.capture = None
    routes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if rec_router is not None:
        for layer, calls in rec_router.by_layer().items():
            inds, w = calls[-1]
            routes[layer] = (np.array(inds[0]), np.array(w[0].astype(mx.float32)))
    for i, layer in enumerate(model.layers):  # the teaching model keeps its own router record
        last = getattr(getattr(layer, "ffn", None), "last_route", None)
        if router and last is not None:
            routes[i] = (np.array(last[0][0]), np.array(last[1][0].astype(mx.float32)))
    norms = np.stack([np.linalg.norm(np.array(h[0].astype(mx.float32)), axis=-1) for h in hidden])
    probs = np.array(mx.softmax(logits[0, -1].astype(mx.float32), precise=True))
    best = np.argsort(-probs)[:top_k]
    text = (lambda i: tok.decode([int(i)])) if tok is not None else str
    return Look(
        tokens=[text(i) for i in ids],
        ids=ids,
        attention=[np.array(p[0]) for p in att],
        router=routes,
        residual_norms=norms,
        top_next=[(int(i), text(i), float(probs[i])) for i in best],
    )


# ------------------------------------------------------------------------- check the math


@dataclass
class MathRow:
    name: str  # "embeddings", "layer 0", …, "final norm", "logits"
    max_abs: float
    scale: float  # max |reference| of that state (residual rows: of every state up to it)


@dataclass
class MathReport:
    rows: list[MathRow]
    dtype: str
    tolerance: float
    n_tokens: int

    @property
    def max_abs(self) -> float:
        return max(r.max_abs for r in self.rows)

    @property
    def max_rel(self) -> float:
        return max(r.max_abs / max(1.0, r.scale) for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def table(self) -> str:
        lines = [f"{'state':<14}{'max |engine - ref|':>20}{'scale':>14}{'relative':>12}"]
        for r in self.rows:
            lines.append(
                f"{r.name:<14}{r.max_abs:>20.3e}{r.scale:>14.3e}{r.max_abs / max(1.0, r.scale):>12.2e}"
            )
        lines.append(
            f"dtype {self.dtype}, {self.n_tokens} tokens, tolerance {self.tolerance:.0e} (relative): "
            + ("ok" if self.ok else "EXCEEDED")
        )
        lines.append(f"max abs difference: {self.max_abs:.6e}")
        return "\n".join(lines)


def reference_config(loaded: Any) -> dict[str, Any]:
    """The config dict the reference reads: the checkpoint's keys under the model's parsed args."""
    model = loaded.model
    cfg = dict(getattr(loaded, "config", {}) or {})
    args = getattr(model, "args", None)
    if dataclasses.is_dataclass(args):
        cfg.update(dataclasses.asdict(args))
    cfg.setdefault("model_type", getattr(model, "model_type", ""))
    return cfg


def check_math(
    loaded: Any,
    prompt: str | list[int] = "The quick brown fox jumps over the lazy dog.",
    tolerance: float | None = None,
) -> MathReport:
    """Engine vs float64 reference on `prompt`: one row per residual-stream state, then the
    final norm and the logits."""
    from engine.quant.convert import float_weights

    model = loaded.model
    cfg = reference_config(loaded)
    if family_of(cfg.get("model_type", "")) not in FAMILIES:
        raise ValueError(f"check_math: no reference for model_type {cfg.get('model_type')!r}")
    ids = _ids_of(loaded, prompt)
    with tap_layers(model) as hidden:
        logits = model(mx.array([ids], dtype=mx.int32))
        mx.eval(logits, hidden)
    final = _final_state(model, hidden[-1])
    ref = reference_forward(cfg, float_weights(model), ids)  # float32 tensors, widened per use
    rows = []

    def add(name: str, eng: mx.array, r: np.ndarray) -> None:
        e = np.array(eng.astype(mx.float32), dtype=np.float64).reshape(r.shape)
        rows.append(MathRow(name, float(np.abs(e - r).max()), float(np.abs(r).max())))

    running = 0.0  # errors made where the stream is large are carried forward: scale by the
    for i, (h, r) in enumerate(zip(hidden, ref.hidden)):  # largest |value| held so far
        add("embeddings" if i == 0 else f"layer {i - 1}", h[0], r)
        running = max(running, rows[-1].scale)
        rows[-1].scale = running
    if final is not None:
        add("final norm", final[0], ref.final)
    add("logits", logits[0], ref.logits)
    dtype = str(_float_dtype(model)).replace("mlx.core.", "")
    if dtype == "float32" and _on_int16_matvec(model, len(ids)):
        dtype = "float32 (int16 matvec)"
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-1)
    return MathReport(rows, dtype, tol, len(ids))


def _on_int16_matvec(model: nn.Module, n_tokens: int) -> bool:
    """Whether this prompt's quantized matmuls ran on our int16-activation CPU kernel."""
    from engine.quant.cpu import PREFILL_MIN_ROWS, CpuQuantizedLinear, kernels

    k = kernels()
    if k is None or k.simd() != "avx2":  # the portable kernel multiplies in float32
        return False
    from engine.blas import openblas_loaded

    rows_on_kernel = n_tokens < PREFILL_MIN_ROWS or not openblas_loaded()
    return rows_on_kernel and any(
        isinstance(m, CpuQuantizedLinear) for _, m in model.named_modules()
    )


def _final_state(model: nn.Module, last: mx.array) -> mx.array | None:
    """The final norm applied to the last layer's output, with the model's own norm module."""
    for owner in ("model", "transformer"):
        inner = model.get(owner) if owner in model else None
        if inner is not None:
            for name in ("norm", "ln_f"):
                if name in inner:
                    return inner[name](last)
    if "norm" in model:
        return model["norm"](last)
    return None

"""One-token decoding of llama-family layers in three CPU-kernel calls each.

A decode step at SmolLM2-135M's size was ~90% dispatch: per layer ~27 MLX operations (seven
small matvecs, norms, RoPE, cache slice updates, reshapes, transposes, residual adds), each
queued to MLX's stream thread. On the CPU with our kernels built, `fused_decode` runs each
layer as `decode_qkv` (norm, q/k/v, per-head norm, RoPE), two `kv_write`s (the cache rows,
in place) and `decode_rest` (attention over the cache, o projection, residual, norm, SwiGLU
MLP, residual): kernels/cpu/decode.h.

It applies to a batch of one token whose layers are plain llama-family blocks: `Attention`
with q/k/v/o projections (affine 4/8-bit or float32, biases allowed), optional q/k norm,
`SwiGLU` with SiLU, RMSNorms, and a float32 `KVCache`. Anything else (LoRA wrappers, a
quantized KV cache, a sliding window in force, other devices) returns None and the caller runs
the layers as usual. The position travels as an int32 array, so the graph of a step does not
depend on it: `LATENT_COMPILE_DECODE=1` runs the whole step through `mx.compile` (one trace per
cache capacity), measured slower than the eager step here and so off by default.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.cache import KVCache
from engine.layers.mlp import SwiGLU
from engine.layers.norm import RMSNorm
from engine.quant.cpu import cpu_kernels_for, linear_parts

# LATENT_NO_FUSED_DECODE=1 runs the layers op by op (for comparison and debugging)
ENABLED = not os.environ.get("LATENT_NO_FUSED_DECODE")
# LATENT_COMPILE_DECODE=1 runs the fused step through mx.compile. Off by default: measured 3-7%
# slower than the eager step (BENCHMARKS.md, "Where one decoded token's milliseconds go"), whose
# ~125 kernel calls already cost only ~0.25 ms of Python a token, overlapped with the previous
# step by the generation loop's async evaluation.
COMPILE = bool(os.environ.get("LATENT_COMPILE_DECODE"))

_ATTENTION_ATTRS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "rope",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "scale",
)


def _linears(modules) -> tuple[list, list[int], list[int]] | None:
    parts: list = []
    bits: list[int] = []
    groups: list[int] = []
    for m in modules:
        p = linear_parts(m)
        if p is None:
            return None
        parts += p[0]
        bits.append(p[1])
        groups.append(p[2])
    return parts, bits, groups


def _norm_weight(m: Any) -> mx.array | None:
    if type(m) is not RMSNorm or m.weight.dtype != mx.float32:
        return None
    return m.weight


def _fingerprint(layer: Any) -> tuple | None:
    """What a cached plan depends on: the identity of every array and module a plan reads.
    (A cached plan holds its arrays, so their ids cannot be reused while it exists.)"""
    attn, mlp = layer.get("self_attn"), layer.get("mlp")
    if attn is None or mlp is None:
        return None
    mods = [attn, mlp, layer.get("input_layernorm"), layer.get("post_attention_layernorm")]
    mods += [attn.get(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
    mods += [mlp.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    return tuple(id(m) for m in mods) + tuple(
        id(v) for m in mods if m is not None for v in m.values()
    )


def _cached_plan(layer: Any, offset: int) -> tuple | None:
    """`_plan`, rebuilt only when the layer's modules or arrays changed (~25 us a layer saved:
    most of the Python time of a decode step)."""
    key = _fingerprint(layer)
    held = layer.__dict__.get("_fused_plan")
    if held is not None and held[0] == key and key is not None:
        plan = held[1]
    else:
        plan = _plan(layer)
        layer.__dict__["_fused_plan"] = (key, plan)
    rope = layer.self_attn.rope if plan is not None else None
    if rope is not None and rope.rope_type == "dynamic":  # its frequencies depend on the length
        qkv, rest = plan
        return dict(qkv, periods=rope.periods_at(offset, 1)), rest
    return plan  # the cached object itself: the compiled step is keyed on it


def _plan(layer: Any) -> tuple | None:
    """The kernel arguments of one layer, or None when it does not fit."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(mlp) is not SwiGLU or mlp._act is not nn.silu:
        return None
    if not all(hasattr(attn, a) for a in _ATTENTION_ATTRS):
        return None
    norms = [
        _norm_weight(layer.get("input_layernorm")),
        _norm_weight(layer.get("post_attention_layernorm")),
    ]
    qkv = _linears((attn.q_proj, attn.k_proj, attn.v_proj))
    rest = _linears((attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if qkv is None or rest is None or any(w is None for w in norms):
        return None
    q_norm = k_norm = None
    if "q_norm" in attn:
        q_norm, k_norm = _norm_weight(attn.q_norm), _norm_weight(attn.k_norm)
        if q_norm is None or k_norm is None:
            return None
    rope = attn.rope
    eps = layer.input_layernorm.eps
    return (
        dict(
            norm=norms[0],
            linears=qkv[0],
            bits=qkv[1],
            groups=qkv[2],
            q_norm=q_norm,
            k_norm=k_norm,
            periods=rope.periods_at(0, 1),
            n_heads=attn.n_heads,
            n_kv_heads=attn.n_kv_heads,
            head_dim=attn.head_dim,
            eps=eps,
            rope_dims=rope.dims,
            traditional=rope.traditional,
            rope_scale=rope.scale,
            mscale=rope.mscale,
        ),
        dict(
            linears=rest[0],
            bits=rest[1],
            groups=rest[2],
            norm=norms[1],
            n_heads=attn.n_heads,
            eps=layer.post_attention_layernorm.eps,
            attn_scale=attn.scale,
        ),
    )


def _layer_step(kern, h, pos, keys, values, plan):
    qkv_args, rest_args = plan
    hd = qkv_args["head_dim"]
    q_size, kv_size = qkv_args["n_heads"] * hd, qkv_args["n_kv_heads"] * hd
    qkv = kern.decode_qkv(h, pos, **qkv_args)
    keys = kern.kv_write(keys, qkv, pos, q_size)
    values = kern.kv_write(values, qkv, pos, q_size + kv_size)
    return kern.decode_rest(h, qkv, keys, values, pos, **rest_args), keys, values


def _step_function(kern, plans: list):
    """f(h, pos, k0, v0, k1, v1, ...) -> (h, k0', v0', ...): every layer, weights as constants."""

    def step(h, pos, *buffers):
        step.traces += 1  # runs only while MLX traces it (tests read this)
        out = []
        for i, plan in enumerate(plans):
            h, k, v = _layer_step(kern, h, pos, buffers[2 * i], buffers[2 * i + 1], plan)
            out += [k, v]
        return (h, *out)

    step.traces = 0
    return step


def _compiled_step(layers: list, kern, plans: list):
    """The `mx.compile`d step for these plans (when `COMPILE`), kept on the first layer until a
    plan changes.

    Compiled, a step is one call that replays the traced graph (retraced only when the cache
    buffers grow, every 256 positions: the position is an input array, so the graph does not
    depend on it) instead of ~120 Python kernel calls. Frequencies of a "dynamic" RoPE change
    with the length, so such models run uncompiled.
    """
    if not COMPILE or any(layer.self_attn.rope.rope_type == "dynamic" for layer in layers):
        return None
    key = (id(kern), tuple(id(p) for p in plans))
    held = layers[0].__dict__.get("_fused_step")
    if held is not None and held[0] == key:
        return held[1]
    fn = _step_function(kern, plans)
    compiled = mx.compile(fn)
    layers[0].__dict__["_fused_step"] = (key, compiled, fn)  # fn.traces: how often it traced
    return compiled


def fused_decode(layers: list, h: mx.array, cache: list | None) -> mx.array | None:
    """Run `layers` on h (1, 1, D) with our fused kernels, updating `cache`; None when they do
    not apply (then nothing has been touched)."""
    if not ENABLED or cache is None or h.shape[:2] != (1, 1) or len(cache) != len(layers):
        return None
    kern = cpu_kernels_for(h)
    if kern is None or not hasattr(kern, "decode_qkv"):
        return None
    if any(type(c) is not KVCache for c in cache):
        return None
    offset = cache[0].offset
    if any(c.offset != offset for c in cache):
        return None
    plans = [_cached_plan(layer, offset) for layer in layers]
    if any(p is None for p in plans):
        return None
    pos = mx.array(offset, dtype=mx.int32)
    buffers = []
    for (qkv_args, _), c in zip(plans, cache):
        hd = qkv_args["head_dim"]
        buffers += c.take_buffers(qkv_args["n_kv_heads"], hd, hd)
    try:
        step = _compiled_step(layers, kern, plans) or _step_function(kern, plans)
        h, *new = step(h, pos, *buffers)
    except BaseException:
        for i, c in enumerate(cache):  # a kernel refused its arguments: nothing has run
            c.keys, c.values = buffers[2 * i], buffers[2 * i + 1]
        raise
    del buffers  # the old buffers are the writes' alone now: written in place
    for i, c in enumerate(cache):
        c.put_buffers(new[2 * i], new[2 * i + 1])
    return h

"""An independent float64 numpy forward pass, the yardstick `engine.inspect.check_math` uses.

`reference_forward(config, weights, ids)` recomputes a decoder from a plain HF-style config dict
and float64 numpy weights under the engine's parameter names and layouts (Linear weights
(out, in); gpt2's Conv1D already transposed, as `Model.sanitize` leaves them). It returns the
residual stream after the embedding and after every layer, the final-normed hidden state, the
logits, and (on request) each layer's attention probabilities (H, L, L).

Families: llama (mistral, smollm), qwen2, qwen3 (dense, with RoPE default/linear/llama3/yarn and
GGUF freq factors, half-split or interleaved pairs), gpt2, deepseek_v2/v3 (multi-head latent
attention built per head from the latent, greedy / group-limited / noaux_tc routing, shared
experts), and tiny (the teaching model of engine/models/tiny.py, every design choice).
Biases and qk-norm are read from which tensors exist.

No MLX here by design: this module imports only numpy and math, so an error in the engine's
kernels, masks or caches cannot hide in both sides of the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALIASES = {"mistral": "llama", "smollm": "llama", "smollm2": "llama"}
FAMILIES = ("llama", "qwen2", "qwen3", "gpt2", "tiny", "deepseek_v2", "deepseek_v3")


@dataclass
class RefResult:
    hidden: list[np.ndarray]  # [embeddings, after layer 0, …, after layer n-1], each (L, D)
    final: np.ndarray  # (L, D) after the final norm
    logits: np.ndarray  # (L, vocab)
    attention: list[np.ndarray] = field(default_factory=list)  # per layer (H, L, L) if asked
    router: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (L, k) ids, weights


def family_of(model_type: str) -> str:
    return ALIASES.get(model_type, model_type)


# ------------------------------------------------------------------------------ small math


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


_erf = np.vectorize(math.erf)


def act(name: str, x: np.ndarray) -> np.ndarray:
    if name in ("silu", "swish"):
        return x / (1.0 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"reference: unsupported activation {name!r}")


def linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ w[f"{name}.weight"].T
    b = w.get(f"{name}.bias")
    return y if b is None else y + b


# ------------------------------------------------------------------------------------ RoPE


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            p.update({k: v for k, v in config[key].items() if v is not None})
    theta = p.get("rope_theta", config.get("rope_theta"))
    p["rope_theta"] = float(theta) if theta is not None else 10000.0
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


def rope_inv_freq(dims: int, config: dict[str, Any]) -> tuple[np.ndarray, float, float]:
    """(inv_freq (dims/2,), position scale, magnitude factor) as the HF rope functions define."""
    p = rope_params(config)
    base = p["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    kind, pos_scale, mag = p["rope_type"], 1.0, 1.0
    if kind == "linear":
        pos_scale = 1.0 / float(p["factor"])
    elif kind == "llama3":
        factor, lo, hi = (
            float(p["factor"]),
            float(p.get("low_freq_factor", 1.0)),
            float(p.get("high_freq_factor", 4.0)),
        )
        old = float(p.get("original_max_position_embeddings") or config["max_position_embeddings"])
        wl = 2 * math.pi / inv
        scaled = np.where(wl > old / lo, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        mid = (wl >= old / hi) & (wl <= old / lo)
        inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "yarn":
        orig = float(p.get("original_max_position_embeddings") or config["max_position_embeddings"])
        factor = float(p.get("factor") or config["max_position_embeddings"] / orig)
        bf, bs = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def cdim(rot: float) -> float:
            return dims * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = cdim(bf), cdim(bs)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dims - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = np.clip((np.arange(dims // 2) - lo) / (hi - lo), 0, 1)
        inv = (inv / factor) * ramp + inv * (1 - ramp)
        if p.get("attention_factor") is not None:
            mag = float(p["attention_factor"])
        else:

            def ms(s: float, m: float = 1.0) -> float:
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            m, mad = p.get("mscale"), p.get("mscale_all_dim")
            mag = ms(factor, m) / ms(factor, mad) if (m and mad) else ms(factor)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"reference: unsupported rope_type {kind!r}")
    if p.get("freq_factors") is not None:
        inv = inv / np.asarray(p["freq_factors"], dtype=np.float64)
    return inv, pos_scale, mag


def apply_rope(
    x: np.ndarray, positions: np.ndarray, rope: tuple, dims: int, interleaved: bool
) -> np.ndarray:
    """x (H, L, D): rotate the first `dims` features; interleaved pairs or half-split."""
    inv, pos_scale, mag = rope
    ang = (positions.astype(np.float64) * pos_scale)[:, None] * inv[None]  # (L, dims/2)
    cos, sin = np.cos(ang), np.sin(ang)
    r, rest = x[..., :dims] * mag, x[..., dims:]
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
        out = np.empty_like(r)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
    else:
        a, b = r[..., : dims // 2], r[..., dims // 2 :]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return np.concatenate([out, rest], axis=-1)


def alibi_slopes(n: int) -> np.ndarray:
    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n).is_integer():
        return np.array(pow2(n))
    c = 2 ** math.floor(math.log2(n))
    return np.array(pow2(c) + pow2(2 * c)[0::2][: n - c])


def sinusoidal(positions: np.ndarray, dims: int, base: float = 10000.0) -> np.ndarray:
    half = np.arange(0, dims, 2, dtype=np.float64)
    ang = positions[:, None].astype(np.float64) / base ** (half / dims)[None]
    pe = np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(len(positions), -1)
    return pe[:, :dims]


# ------------------------------------------------------------------------------- attention


def attend(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    bias: np.ndarray | None,
    causal: bool = True,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """q (H, L, D), k/v (Hkv, L, ·) -> (out (H, L, Dv), probs (H, L, L)); GQA by repeating K/V."""
    H, L, _ = q.shape
    rep = H // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = q @ k.transpose(0, 2, 1) * scale  # (H, L, L)
    if bias is not None:
        s = s + bias
    i, j = np.arange(L)[:, None], np.arange(L)[None]
    allowed = (j <= i) if causal else np.ones((L, L), bool)
    if window is not None:
        allowed = allowed & (i - j < window)
    s = np.where(allowed[None], s, -np.inf)
    p = softmax(s)
    return p @ v, p


# ---------------------------------------------------------------------------------- families


def _llama(config: dict, w: dict, ids: np.ndarray, want_attn: bool) -> RefResult:
    D, H = config["hidden_size"], config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    eps = config.get("rms_norm_eps", 1e-6)
    L = len(ids)
    pos = np.arange(L)
    rot = int(
        hd
        * float(
            rope_params(config).get(
                "partial_rotary_factor", config.get("partial_rotary_factor") or 1.0
            )
        )
    )
    rope = rope_inv_freq(rot, config)
    window = config.get("sliding_window") if config.get("use_sliding_window") is not False else None
    n_layers = config["num_hidden_layers"]
    x = w["model.embed_tokens.weight"][ids]
    res = RefResult(hidden=[x], final=x, logits=x)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, w, p + "self_attn.q_proj").reshape(L, H, hd).transpose(1, 0, 2)
        k = linear(h, w, p + "self_attn.k_proj").reshape(L, Hkv, hd).transpose(1, 0, 2)
        v = linear(h, w, p + "self_attn.v_proj").reshape(L, Hkv, hd).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in w:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        inter = bool(config.get("rope_traditional", False))
        q, k = apply_rope(q, pos, rope, rot, inter), apply_rope(k, pos, rope, rot, inter)
        o, probs = attend(q, k, v, hd**-0.5, None, window=window)
        if want_attn:
            res.attention.append(probs)
        x = x + linear(o.transpose(1, 0, 2).reshape(L, -1), w, p + "self_attn.o_proj")
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        a = act(config.get("hidden_act", "silu"), linear(h, w, p + "mlp.gate_proj"))
        x = x + linear(a * linear(h, w, p + "mlp.up_proj"), w, p + "mlp.down_proj")
        res.hidden.append(x)
    res.final = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    res.logits = res.final @ head.T
    return res


def _gpt2(config: dict, w: dict, ids: np.ndarray, want_attn: bool) -> RefResult:
    D, H = config["n_embd"], config["n_head"]
    hd = D // H
    eps = config.get("layer_norm_epsilon", 1e-5)
    L = len(ids)
    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:L]
    res = RefResult(hidden=[x], final=x, logits=x)
    actname = config.get("activation_function", "gelu_new")
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = linear(h, w, p + "attn.c_attn").reshape(L, 3, H, hd)
        q, k, v = (qkv[:, j].transpose(1, 0, 2) for j in range(3))
        scale = hd**-0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx"):
            scale /= i + 1
        o, probs = attend(q, k, v, scale, None)
        if want_attn:
            res.attention.append(probs)
        x = x + linear(o.transpose(1, 0, 2).reshape(L, -1), w, p + "attn.c_proj")
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        x = x + linear(act(actname, linear(h, w, p + "mlp.c_fc")), w, p + "mlp.c_proj")
        res.hidden.append(x)
    res.final = layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    res.logits = res.final @ w.get("lm_head.weight", w["transformer.wte.weight"]).T
    return res


def _tiny_norm(config: dict, w: dict, name: str, x: np.ndarray) -> np.ndarray:
    eps = config.get("norm_eps", 1e-5)
    if config.get("norm", "rmsnorm") == "rmsnorm":
        return rms_norm(x, w[name + ".weight"], eps)
    return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps)


def _tiny(config: dict, w: dict, ids: np.ndarray, want_attn: bool) -> RefResult:
    D, H = config["hidden_size"], config["num_heads"]
    kind = config.get("attention", "mha")
    Hkv = config.get("num_kv_heads") or H if kind == "gqa" else H
    hd = D // H
    L = len(ids)
    pos = np.arange(L)
    pe = config.get("positional", "rope")
    x = w["embed_tokens.weight"][ids]
    if pe == "sinusoidal":
        x = x + sinusoidal(pos, D)
    elif pe == "learned":
        x = x + w["positions.weight"][:L]
    res = RefResult(hidden=[x], final=x, logits=x)
    rope = (
        rope_inv_freq(hd, {"rope_theta": config.get("rope_theta", 10000.0)})
        if pe == "rope"
        else None
    )
    bias = None
    if pe == "alibi":
        dist = (pos[:, None] - pos[None]).astype(np.float64)
        bias = -alibi_slopes(H)[:, None, None] * np.abs(dist)[None]
    pre, resid = config.get("pre_norm", True), config.get("residual", True)
    for i in range(config["num_layers"]):
        p = f"layers.{i}."

        def attn_fn(h: np.ndarray, p: str = p) -> np.ndarray:
            if kind == "mla":
                rd = config.get("qk_rope_head_dim", 8)
                mla_rope = (
                    rope_inv_freq(rd, {"rope_theta": config.get("rope_theta", 10000.0)})
                    if pe == "rope"
                    else None
                )
                o, probs = mla_attention(
                    w,
                    p + "attn.",
                    h,
                    (H, hd, rd, hd, config.get("kv_lora_rank", 16)),
                    config.get("norm_eps", 1e-5),
                    pos,
                    mla_rope,
                    False,
                    (hd + rd) ** -0.5,
                    bias,
                    causal=config.get("causal", True),
                )
                if want_attn:
                    res.attention.append(probs)
                return linear(o.transpose(1, 0, 2).reshape(L, -1), w, p + "attn.o_proj")
            q = linear(h, w, p + "attn.q_proj").reshape(L, H, hd).transpose(1, 0, 2)
            k = linear(h, w, p + "attn.k_proj").reshape(L, Hkv, hd).transpose(1, 0, 2)
            v = linear(h, w, p + "attn.v_proj").reshape(L, Hkv, hd).transpose(1, 0, 2)
            if rope is not None:
                q, k = apply_rope(q, pos, rope, hd, False), apply_rope(k, pos, rope, hd, False)
            o, probs = attend(q, k, v, hd**-0.5, bias, causal=config.get("causal", True))
            if want_attn:
                res.attention.append(probs)
            return linear(o.transpose(1, 0, 2).reshape(L, -1), w, p + "attn.o_proj")

        def ffn_fn(h: np.ndarray, p: str = p) -> np.ndarray:
            if config.get("ffn", "dense") == "dense":
                return linear(act("gelu", linear(h, w, p + "ffn.up_proj")), w, p + "ffn.down_proj")
            k_top = config.get("top_k", 2)
            probs = softmax(h @ w[p + "ffn.router.weight"].T)  # (L, E)
            top = np.argsort(-probs, axis=-1, kind="stable")[:, :k_top]
            wts = np.take_along_axis(probs, top, -1)
            wts = wts / wts.sum(-1, keepdims=True)
            res.router.append((top, wts))
            out = np.zeros_like(h)
            for t in range(L):
                for e, g in zip(top[t], wts[t]):
                    up = h[t] @ w[p + "ffn.up_proj.weight"][e].T
                    out[t] += g * (act("gelu", up) @ w[p + "ffn.down_proj.weight"][e].T)
            return out

        for sub, fn in (("attn_norm", attn_fn), ("ffn_norm", ffn_fn)):
            if pre:
                y = fn(_tiny_norm(config, w, p + sub, x))
                x = x + y if resid else y
            else:
                y = fn(x)
                x = _tiny_norm(config, w, p + sub, x + y if resid else y)
        res.hidden.append(x)
    res.final = _tiny_norm(config, w, "norm", x) if pre else x
    res.logits = res.final @ w.get("lm_head.weight", w["embed_tokens.weight"]).T
    return res


def _swiglu(w: dict, prefix: str, h: np.ndarray, actname: str) -> np.ndarray:
    a = act(actname, linear(h, w, prefix + "gate_proj"))
    return linear(a * linear(h, w, prefix + "up_proj"), w, prefix + "down_proj")


def deepseek_route(
    config: dict, logits: np.ndarray, bias: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek V2/V3 router: (N, E) logits -> expert ids (N, k) and weights (N, k)."""
    k = config["num_experts_per_tok"]
    v3 = family_of(config.get("model_type", "")) == "deepseek_v3"  # V3 configs may omit these keys
    scoring = config.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    scores = softmax(logits) if scoring == "softmax" else 1 / (1 + np.exp(-logits))
    choice = scores if bias is None else scores + bias
    method = config.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    G, TG = config.get("n_group") or 1, config.get("topk_group") or 1
    N, E = choice.shape
    if method != "greedy" and G > 1 and TG < G:
        grouped = choice.reshape(N, G, E // G)
        if method == "noaux_tc":  # a group scores the sum of its two best experts
            gs = np.sort(grouped, axis=-1)[..., -min(2, E // G) :].sum(-1)
        else:  # group_limited_greedy: a group scores its best expert
            gs = grouped.max(-1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :TG]
        allowed = np.zeros((N, G), bool)
        np.put_along_axis(allowed, keep, True, axis=-1)
        choice = np.where(np.repeat(allowed, E // G, axis=-1), choice, -np.inf)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, ids, -1)
    normalize = bool(config.get("norm_topk_prob")) and k > 1
    if normalize:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    factor = float(config.get("routed_scaling_factor", 1.0))
    if factor != 1.0 and (v3 or not normalize):  # V2 scales only weights it did not normalise
        weights = weights * factor
    return ids, weights


def mla_attention(
    w: dict,
    pa: str,
    h: np.ndarray,
    dims: tuple,
    eps: float,
    pos: np.ndarray,
    rope: tuple | None,
    inter: bool,
    scale: float,
    bias: np.ndarray | None = None,
    causal: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head latent attention with per-head K/V built from the latent: (out (H, L, v), probs)."""
    H, nope, rope_d, vd, r = dims
    L = h.shape[0]
    if pa + "q_proj.weight" in w:
        q = linear(h, w, pa + "q_proj")
    else:
        q = linear(
            rms_norm(linear(h, w, pa + "q_a_proj"), w[pa + "q_a_layernorm.weight"], eps),
            w,
            pa + "q_b_proj",
        )
    q = q.reshape(L, H, nope + rope_d).transpose(1, 0, 2)  # (H, L, nope + rope)
    ckv = linear(h, w, pa + "kv_a_proj_with_mqa")
    c, k_pe = ckv[:, :r], ckv[:, r:]
    c = rms_norm(c, w[pa + "kv_a_layernorm.weight"], eps)  # the cached latent (L, r)
    kv = linear(c, w, pa + "kv_b_proj").reshape(L, H, nope + vd).transpose(1, 0, 2)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_pe, k_pe = q[..., nope:], k_pe[None]  # k_pe (1, L, rope): one rotary key for all heads
    if rope is not None:
        q_pe, k_pe = (
            apply_rope(q_pe, pos, rope, rope_d, inter),
            apply_rope(k_pe, pos, rope, rope_d, inter),
        )
    k = np.concatenate([k_nope, np.repeat(k_pe, H, axis=0)], axis=-1)
    return attend(np.concatenate([q[..., :nope], q_pe], -1), k, v, scale, bias, causal=causal)


def _deepseek(config: dict, w: dict, ids: np.ndarray, want_attn: bool) -> RefResult:
    """DeepSeek V2/V3: multi-head latent attention (materialised per head) and routed + shared
    SwiGLU experts (engine names: stacked `mlp.switch_mlp.*` (E, out, in))."""
    H, eps = config["num_attention_heads"], config.get("rms_norm_eps", 1e-6)
    nope, rope_d, vd = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    r = config["kv_lora_rank"]
    L = len(ids)
    pos = np.arange(L)
    rope = rope_inv_freq(rope_d, config)
    inter = bool(config.get("rope_interleave", True))
    scale = (nope + rope_d) ** -0.5
    p = rope_params(config)
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        f, m = float(p["factor"]), float(p["mscale_all_dim"])
        mscale = 0.1 * m * math.log(f) + 1.0 if f > 1 else 1.0
        scale = scale * mscale * mscale
    actname = config.get("hidden_act", "silu")
    x = w["model.embed_tokens.weight"][ids]
    res = RefResult(hidden=[x], final=x, logits=x)
    for i in range(config["num_hidden_layers"]):
        pa = f"model.layers.{i}.self_attn."
        h = rms_norm(x, w[f"model.layers.{i}.input_layernorm.weight"], eps)
        o, probs = mla_attention(w, pa, h, (H, nope, rope_d, vd, r), eps, pos, rope, inter, scale)
        if want_attn:
            res.attention.append(probs)
        x = x + linear(o.transpose(1, 0, 2).reshape(L, -1), w, pa + "o_proj")
        pm = f"model.layers.{i}.mlp."
        h = rms_norm(x, w[f"model.layers.{i}.post_attention_layernorm.weight"], eps)
        if pm + "gate.weight" in w:
            e_ids, e_w = deepseek_route(
                config, h @ w[pm + "gate.weight"].T, w.get(pm + "gate.e_score_correction_bias")
            )
            res.router.append((e_ids, e_w))
            g, u, d = (
                w[pm + f"switch_mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")
            )
            y = np.zeros_like(h)
            for t in range(L):
                for e, wt in zip(e_ids[t], e_w[t]):
                    y[t] += wt * ((act(actname, g[e] @ h[t]) * (u[e] @ h[t])) @ d[e].T)
            if pm + "shared_experts.gate_proj.weight" in w:
                y = y + _swiglu(w, pm + "shared_experts.", h, actname)
        else:
            y = _swiglu(w, pm, h, actname)
        x = x + y
        res.hidden.append(x)
    res.final = rms_norm(x, w["model.norm.weight"], eps)
    res.logits = res.final @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
    return res


_FORWARDS = {
    "llama": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
    "gpt2": _gpt2,
    "tiny": _tiny,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}


def reference_forward(
    config: dict[str, Any], weights: dict[str, np.ndarray], ids: Any, want_attention: bool = False
) -> RefResult:
    """float64 forward of one sequence `ids` (L,) for the family named by config["model_type"]."""
    family = family_of(config.get("model_type", ""))
    fn = _FORWARDS.get(family)
    if fn is None:
        raise ValueError(
            f"reference: model_type {config.get('model_type')!r} not covered; covered: {', '.join(FAMILIES)}"
        )
    return fn(config, _Float64(weights), np.asarray(ids, dtype=np.int64), want_attention)


class _Float64(dict):
    """Read-only view that hands out each tensor as float64 when read, so a large model's
    weights are never held twice in float64 (anything with the array protocol is accepted)."""

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(super().__getitem__(key), dtype=np.float64)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

"""DeepSeek KV-cache size, generation peak memory and decode speed: ours vs mlx-lm.

Three parts, one run (`python bench/deepseek_cache.py`, add `--quick` for a short smoke run):

A. Cache bytes (element dtype fp16 for all, as a GPU would hold them) at 4k/16k/32k tokens for a
   DeepSeek-V2-Lite-shaped model (27 layers, 16 heads, kv_lora_rank 512, rope 64, nope 128,
   v 128): our latent cache (fp16, 8-bit, 4-bit) vs mlx-lm's deepseek_v2 (per-head K/V) and
   deepseek_v3 (latent) caches. Each implementation's per-token cache shapes are read off a real
   8-token prefill of its own model; the caches are then filled directly with random values of
   those shapes (a 32k prefill on 2 CPU cores would take too long). Caches that would exceed
   `--budget-gb` are not allocated: their size is computed from the measured bytes per token and
   marked "computed". Also the full DeepSeek-V2 shape (128 heads, hidden 5120) per token.
B. Peak memory of one generation step (fp32, the engine's CPU dtype) with caches filled to each
   context: weights + cache + transients, per implementation, plus the step's time.
C. Decode tokens/s on a small random V3-shaped model (noaux_tc router, 16 experts): ours vs
   mlx-lm deepseek_v3 with the same weights and the same greedy loop; their greedy tokens are
   compared, and the logit error of our 8-/4-bit latent caches is reported.

mlx_lm is imported here only, as the peer to compare against; engine/ never imports it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.blas import maybe_reexec_with_openblas  # noqa: E402

maybe_reexec_with_openblas()  # same BLAS for both sides; must run before MLX starts

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from engine.layers.mla import make_latent_cache  # noqa: E402
from engine.models import deepseek_v2 as ours_v2  # noqa: E402
from engine.models import deepseek_v3 as ours_v3  # noqa: E402

GB = 1 << 30
YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
LITE = dict(
    model_type="deepseek_v2",
    vocab_size=2048,
    hidden_size=2048,
    intermediate_size=1024,
    moe_intermediate_size=128,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    topk_method="greedy",
    routed_scaling_factor=1.0,
    max_position_embeddings=163840,
    rope_theta=10000.0,
    rope_scaling=YARN,
    rms_norm_eps=1e-6,
)
FULL_V2 = dict(
    LITE,
    hidden_size=5120,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    num_hidden_layers=1,
    intermediate_size=256,
)
SMALL_V3 = dict(
    model_type="deepseek_v3",
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    kv_lora_rank=256,
    q_lora_rank=384,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
)


# ------------------------------------------------------------------------------ models


def build_ours(cfg: dict):
    family = ours_v3 if cfg["model_type"] == "deepseek_v3" else ours_v2
    model = family.Model(family.ModelArgs.from_dict(cfg))
    # random router weights and correction biases (they start at zero)
    for layer in model.layers:
        if "gate" in layer.mlp:
            layer.mlp.gate.weight = 0.5 * mx.random.normal(layer.mlp.gate.weight.shape)
            if "e_score_correction_bias" in layer.mlp.gate:
                layer.mlp.gate.e_score_correction_bias = 0.1 * mx.random.normal(
                    (cfg["n_routed_experts"],)
                )
    mx.eval(model.parameters())
    return model


def build_mlx_lm(cfg: dict, family: str, weights: dict):
    import importlib

    mod = importlib.import_module(f"mlx_lm.models.{family}")
    if family == "deepseek_v3":  # its router only knows noaux_tc (same cache, other routing)
        cfg = dict(
            cfg,
            topk_method="noaux_tc",
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
        )
    args = mod.ModelArgs.from_dict(dict(cfg, model_type=family))
    model = mod.Model(args)
    w = dict(weights)
    if family == "deepseek_v3":  # its router always takes a correction bias
        for i in range(cfg["num_hidden_layers"]):
            key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            if f"model.layers.{i}.mlp.gate.weight" in w and key not in w:
                w[key] = mx.zeros((cfg["n_routed_experts"],))
    model.load_weights(list(model.sanitize(w).items()), strict=True)
    mx.eval(model.parameters())
    return model


def mlx_lm_cache(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def per_token_shapes(model, cache) -> list[tuple]:
    """Float shapes one token adds to layer 0's cache, read off a real 8-token prefill."""
    model(mx.array([list(range(1, 9))]), cache)
    c = cache[0]
    arrays = (
        c.state
        if hasattr(c, "buffers")
        else (c.keys[..., : c.offset, :], c.values[..., : c.offset, :])
    )
    return [a.shape[:2] + a.shape[3:] for a in arrays]  # drop the sequence axis (axis 2)


def fill(cache, shapes, n: int, dtype) -> None:
    """Append n random positions of the given per-token float shapes to every layer's cache."""
    for c in cache:
        parts = [mx.random.normal((s[0], s[1], n, *s[2:])).astype(dtype) for s in shapes]
        c.update_and_fetch(*parts)
        mx.eval(c.buffers if hasattr(c, "buffers") else (c.keys, c.values))


def cache_nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def make_caches(kind: str, n_layers: int, bits: int | None = None) -> list:
    if kind == "ours":
        a = LITE
        return [
            make_latent_cache(a["kv_lora_rank"], a["qk_rope_head_dim"], bits)
            for _ in range(n_layers)
        ]
    from mlx_lm.models.cache import KVCache  # what mlx-lm's make_prompt_cache gives these models

    return [KVCache() for _ in range(n_layers)]


def probe_bytes_per_token(kind: str, bits: int | None, shapes, dtype) -> int:
    """Bytes one position costs one layer, measured on a 256-position (one growth step) fill."""
    c = make_caches(kind, 1, bits)
    fill(c, shapes, 256, dtype)
    return cache_nbytes(c) // 256


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def free(*objs) -> None:
    del objs
    gc.collect()
    mx.clear_cache()


# ------------------------------------------------------------------------------ part A


def part_a(contexts: list[int], budget: float) -> list[str]:
    lines = [
        "| cache (fp16 elements) | bytes/token/layer | "
        + " | ".join(_ctx(n) for n in contexts)
        + " | mlx-lm v2 / this |",
        "|---|---|" + "---|" * len(contexts) + "---|",
    ]
    mx.random.seed(0)
    small = dict(LITE, num_hidden_layers=2)  # per-token shapes only: 2 layers suffice
    model = build_ours(small)
    weights = dict(tree_flatten(model.parameters()))
    impls = [
        ("ours latent fp16", "ours", None),
        ("ours latent 8-bit", "ours", 8),
        ("ours latent 4-bit", "ours", 4),
    ]
    shapes = {"ours": per_token_shapes(model, model.make_cache(kv_bits=0))}
    for fam in ("deepseek_v2", "deepseek_v3"):
        m = build_mlx_lm(small, fam, weights)
        shapes[fam] = per_token_shapes(m, mlx_lm_cache(m))
        impls.append((f"mlx-lm {fam}", fam, None))
        free(m)
    free(model, weights)
    layers = LITE["num_hidden_layers"]
    results = {}
    for name, kind, bits in impls:
        per_tok = probe_bytes_per_token(kind, bits, shapes[kind], mx.float16)
        sizes = []
        for n in contexts:
            predicted = per_tok * layers * n
            if predicted > budget * GB:
                sizes.append((predicted, True))
                continue
            cache = make_caches(kind, layers, bits)
            fill(cache, shapes[kind], n, mx.float16)
            sizes.append((cache_nbytes(cache), False))
            free(cache)
        results[name] = (per_tok, sizes)
    base = results["mlx-lm deepseek_v2"][1]
    for name, (per_tok, sizes) in results.items():
        cells = [f"{b / GB:.3f} GB" + (" (computed)" if computed else "") for b, computed in sizes]
        ratios = "/".join(f"{b0 / b:.1f}x" for (b0, _), (b, _) in zip(base, sizes))
        lines.append(f"| {name} | {per_tok:,} | " + " | ".join(cells) + f" | {ratios} |")

    # full DeepSeek-V2 (128 heads): bytes per token per layer, fp16 elements
    m = build_ours(FULL_V2)
    ours_shapes = per_token_shapes(m, m.make_cache(kv_bits=0))
    weights = dict(tree_flatten(m.parameters()))
    free(m)
    ml = build_mlx_lm(FULL_V2, "deepseek_v2", weights)
    ml_shapes = per_token_shapes(ml, mlx_lm_cache(ml))
    free(ml, weights)
    full = {
        f"ours latent {name}": probe_bytes_per_token("ours", bits, ours_shapes, mx.float16)
        for name, bits in (("fp16", None), ("8-bit", 8), ("4-bit", 4))
    }
    full["mlx-lm deepseek_v2"] = probe_bytes_per_token("deepseek_v2", None, ml_shapes, mx.float16)
    lines += [
        "",
        "Full DeepSeek-V2 shape (128 heads, hidden 5120), bytes per token per layer, fp16 elements "
        f"(mlx-lm v2 caches K {ml_shapes[0]} and V {ml_shapes[1]} per token):",
        "",
        "| cache | bytes/token/layer | mlx-lm v2 / this |",
        "|---|---|---|",
    ]
    for name, b in full.items():
        lines.append(f"| {name} | {b:,} | {full['mlx-lm deepseek_v2'] / b:.1f}x |")
    return lines


# ------------------------------------------------------------------------------ part B


def part_b(contexts: list[int], budget: float) -> list[str]:
    lines = [
        "| implementation | context | weights | cache | peak during the step | step time |",
        "|---|---|---|---|---|---|",
    ]
    mx.random.seed(1)
    ours = build_ours(LITE)
    weights = dict(tree_flatten(ours.parameters()))
    w_bytes = sum(v.nbytes for v in weights.values())
    impls = [("ours (latent)", ours, "ours", None), ("ours (4-bit latent)", ours, "ours", 4)]
    for fam in ("deepseek_v3", "deepseek_v2"):
        impls.append((f"mlx-lm {fam}", fam, fam, None))
    shapes = {"ours": per_token_shapes(ours, ours.make_cache(kv_bits=0))}
    layers = LITE["num_hidden_layers"]
    for name, model, kind, bits in impls:
        if isinstance(model, str):
            model = build_mlx_lm(LITE, model, weights)
            shapes[kind] = per_token_shapes(model, mlx_lm_cache(model))
        per_tok = probe_bytes_per_token(kind, bits, shapes[kind], mx.float32) * layers
        for n in contexts:
            if w_bytes + per_tok * n > budget * GB:
                lines.append(
                    f"| {name} | {_ctx(n)} | {w_bytes / GB:.2f} GB | {per_tok * n / GB:.2f} GB "
                    f"(computed) | not run (over the {budget:g} GB budget) | |"
                )
                continue
            cache = make_caches(kind, layers, bits)
            fill(cache, shapes[kind], n, mx.float32)
            token = mx.array([[7]])
            gc.collect()
            mx.reset_peak_memory()
            t = time.perf_counter()
            mx.eval(model(token, cache))
            dt = time.perf_counter() - t
            peak = mx.get_peak_memory()
            lines.append(
                f"| {name} | {_ctx(n)} | {w_bytes / GB:.2f} GB | {cache_nbytes(cache) / GB:.2f} GB | "
                f"{peak / GB:.2f} GB | {dt:.2f} s |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
            free(cache)
        if kind != "ours":
            free(model)
    free(ours, weights)
    return lines


# ------------------------------------------------------------------------------ part C


def greedy_decode(model, make_cache, prompt: mx.array, n: int):
    cache = make_cache()
    logits = model(prompt, cache)[:, -1]
    mx.eval(logits)
    tokens, steps = [], []
    tok = mx.argmax(logits, axis=-1)
    t0 = time.perf_counter()
    for _ in range(n):
        tokens.append(int(tok.item()))
        logits = model(tok[:, None], cache)[:, -1]
        steps.append(logits)
        tok = mx.argmax(logits, axis=-1)
        mx.eval(tok)
    return tokens, n / (time.perf_counter() - t0), mx.concatenate(steps)


def _cache_errors(model, prompt, tokens, ref) -> dict[int, tuple[float, float, int]]:
    """Per bit width: (max, median) abs logit error over the decode steps, bytes/token/layer."""
    out = {}
    for bits in (8, 4):
        cache = model.make_cache(kv_bits=bits)
        model(prompt, cache)
        errs = [
            np.abs(np.array(model(mx.array([[t]]), cache)[:, -1]) - ref[i]).max()
            for i, t in enumerate(tokens)
        ]
        out[bits] = (float(max(errs)), float(np.median(errs)), cache[0].bytes_per_token)
    return out


def part_c(n_decode: int, rounds: int = 5) -> list[str]:
    mx.random.seed(2)
    ours = build_ours(SMALL_V3)
    weights = dict(tree_flatten(ours.parameters()))
    theirs = build_mlx_lm(SMALL_V3, "deepseek_v3", weights)
    prompt = mx.random.randint(0, SMALL_V3["vocab_size"], (1, 64))
    lines = [
        f"| implementation | decode tok/s, best of {rounds} rounds | median | all rounds | "
        "greedy tokens equal to ours |",
        "|---|---|---|---|---|",
    ]
    runs = {"ours": [], "mlx-lm deepseek_v3": []}
    greedy_decode(ours, lambda: ours.make_cache(kv_bits=0), prompt, 4)  # warm-up
    greedy_decode(theirs, lambda: mlx_lm_cache(theirs), prompt, 4)
    for _ in range(rounds):  # alternate, so load from other processes hits both alike
        runs["ours"].append(
            greedy_decode(ours, lambda: ours.make_cache(kv_bits=0), prompt, n_decode)
        )
        runs["mlx-lm deepseek_v3"].append(
            greedy_decode(theirs, lambda: mlx_lm_cache(theirs), prompt, n_decode)
        )
    ours_tokens, _, ref = runs["ours"][0]
    for name, rs in runs.items():
        tps = [r[1] for r in rs]
        same = sum(a == b for a, b in zip(rs[0][0], ours_tokens))
        lines.append(
            f"| {name} | {max(tps):.1f} | {np.median(tps):.1f} | {', '.join(f'{x:.1f}' for x in tps)} | "
            f"{same}/{len(ours_tokens)} |"
        )
    diff = float(np.abs(np.array(runs["mlx-lm deepseek_v3"][0][2]) - np.array(ref)).max())
    lines += [
        "",
        f"Max abs logit difference ours vs mlx-lm deepseek_v3 over the decode: {diff:.2e}",
        "",
    ]

    ref = np.array(ref)
    errors = {"this MoE model": _cache_errors(ours, prompt, ours_tokens, ref)}
    free(theirs, weights)
    mx.random.seed(2)
    dense = build_ours(dict(SMALL_V3, first_k_dense_replace=SMALL_V3["num_hidden_layers"]))
    d_tokens, _, d_ref = greedy_decode(dense, lambda: dense.make_cache(kv_bits=0), prompt, n_decode)
    errors["same shape, all layers dense"] = _cache_errors(dense, prompt, d_tokens, np.array(d_ref))
    lines += [
        f"Logit error of our quantized latent cache vs the fp32 latent cache ({n_decode} decode steps "
        f"after a 64-token prompt, teacher-forced on the fp32 run's tokens; max |logit| about "
        f"{np.abs(ref).max():.1f}). In the MoE model a small perturbation can flip a router choice, "
        "which shows as a few large steps; the dense variant shows the cache's own error:",
        "",
        "| model | latent cache | bytes/token/layer (fp32 scales) | max abs logit error | median over steps |",
        "|---|---|---|---|---|",
    ]
    for model_name, errs in errors.items():
        for bits, (mx_err, med, per_tok) in errs.items():
            lines.append(f"| {model_name} | {bits}-bit | {per_tok:,} | {mx_err:.3g} | {med:.3g} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument(
        "--budget-gb", type=float, default=6.0, help="largest allocation tried per measurement"
    )
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="256/512 contexts, 8 decode steps")
    ap.add_argument("--parts", default="abc")
    a = ap.parse_args()
    contexts = [256, 512] if a.quick else [int(x) for x in a.contexts.split(",")]
    n_decode = 8 if a.quick else a.decode
    from engine.blas import openblas_loaded

    print(
        f"mlx {mx.__version__}, device {mx.default_device()}, OpenBLAS preloaded: {openblas_loaded()}\n"
    )
    if "a" in a.parts:
        print("## A. KV cache size, DeepSeek-V2-Lite shape (27 layers, 16 heads, r 512, rope 64)\n")
        print("\n".join(part_a(contexts, a.budget_gb)), "\n", flush=True)
    if "b" in a.parts:
        print("## B. One generation step with the cache filled (fp32 weights and cache)\n")
        print("\n".join(part_b(contexts, a.budget_gb)), "\n", flush=True)
    if "c" in a.parts:
        print("## C. Decode speed, small V3-shaped model (8 layers, 16 experts, noaux_tc)\n")
        print("\n".join(part_c(n_decode)), "\n", flush=True)


if __name__ == "__main__":
    main()

"""Where the milliseconds of one decoded token go (our engine, one model).

    python bench/profile_decode.py [--model GGUF] [--context 512] [--iters 30]

Times one full decode step at a given cache length, then each piece alone (evaluated in
isolation, so the sum ignores overlap and adds one dispatch per piece): the q/k/v/o
projections, attention over the cache, the MLP, the norms of one layer (x layers), the LM head,
and the bytes each reads. The gap between the sum and the full step is graph building and
scheduling. Works for llama-style models (self_attn / mlp / norms attribute names).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.blas import maybe_reexec_with_openblas  # noqa: E402


def _time(fn, iters: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn())
    return (time.perf_counter() - t) / iters * 1000


def _nbytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def profile(model_path: str, context: int, iters: int) -> list[tuple[str, float, int]]:
    import mlx.core as mx

    import engine
    from engine.blas import openblas_loaded, use_blas_prefill
    from engine.layers.attention import scaled_dot_product_attention as sdpa

    loaded = engine.load(model_path)
    model = loaded.model
    use_blas_prefill(model)  # the CPU paths generation uses (engine/quant/cpu.py)
    cache = model.make_cache()
    ids = mx.array([[(i * 7) % 1000 + 100 for i in range(context)]])
    model(ids, cache=cache)
    mx.eval([c.state for c in cache])
    tok = mx.array([[42]])

    def full_step():
        out = model(tok, cache=cache)
        for c in cache:
            c.trim(1)  # keep the cache length fixed
        return out

    rows = [("full decode step", _time(full_step, iters), _nbytes(model))]
    t = time.perf_counter()
    for _ in range(iters):
        full_step()  # graph only, never evaluated
    build_ms = (time.perf_counter() - t) / iters * 1000
    inner = model.model
    layer = inner.layers[0]
    attn = layer.self_attn
    n_layers = len(inner.layers)
    x = mx.random.normal((1, 1, loaded.config["hidden_size"]))
    k_cache, v_cache = cache[0].state
    q = mx.random.normal((1, attn.n_heads, 1, attn.head_dim))
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    pieces = [
        ("q/k/v/o projections", lambda: [p(x if p is not attn.o_proj else mx.random.normal((1, 1, attn.n_heads * attn.head_dim))) for p in projections],
         sum(_nbytes(p) for p in projections)),
        ("attention over cache", lambda: sdpa(q, k_cache, v_cache, attn.scale), k_cache.nbytes + v_cache.nbytes),
        ("MLP", lambda: layer.mlp(x), _nbytes(layer.mlp)),
        ("2 RMSNorms + RoPE", lambda: [layer.input_layernorm(x), layer.post_attention_layernorm(x), attn.rope(q, context)], 0),
    ]  # fmt: skip
    for name, fn, nbytes in pieces:
        ms = _time(fn, iters)
        rows.append((f"{name} x{n_layers}", ms * n_layers, nbytes * n_layers))
    head = inner.embed_tokens.as_linear if "lm_head" not in model else model.lm_head
    head_bytes = _nbytes(inner.embed_tokens if "lm_head" not in model else model.lm_head)
    rows.append(("LM head", _time(lambda: head(x), iters), head_bytes))
    rows.append(("building the graph in Python (overlaps the previous step)", build_ms, 0))
    logits = head(x)
    mx.eval(logits)
    rows.append(("sampling (argmax)", _time(lambda: mx.argmax(logits), iters), 0))
    from engine.quant.cpu import kernels

    k = kernels()
    where = f"{k.simd()}, {k.num_threads()} threads" if k is not None else "not loaded"
    print(
        f"openblas: {openblas_loaded()}, CPU kernels: {where}, model {model_path}, cache {context} tokens"
    )
    return rows


def report(rows: list[tuple[str, float, int]]) -> str:
    full = rows[0][1]
    parts = sum(r[1] for r in rows[1:])
    lines = [
        "| piece | ms per token | share of step | MiB read | GB/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, ms, nbytes in rows:
        gbs = nbytes / (ms / 1000) / 1e9 if ms > 0 and nbytes else 0
        lines.append(
            f"| {name} | {ms:.2f} | {100 * ms / full:.0f}% | {nbytes / 2**20:.1f} | {gbs:.1f} |"
        )
    lines.append(f"| sum of pieces | {parts:.2f} | {100 * parts / full:.0f}% | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    maybe_reexec_with_openblas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    from engine.defaults import ensure_default_model

    model = args.model or str(ensure_default_model(progress=lambda *a: None))
    print(report(profile(model, args.context, args.iters)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

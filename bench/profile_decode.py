"""Where the milliseconds of one decoded token go (our engine, one model).

    python bench/profile_decode.py [--model GGUF] [--context 512] [--iters 30]

Times one decode step at a fixed cache length evaluated alone, and the same step pipelined as
the generation loop runs it (the next step's graph built while this one computes). With the
fused decode layers (engine/layers/fused.py) it then reads the kernels' own stage clocks
(`decode_profile()` of latent_kernels.cpu) over the pipelined steps: q/k/v matvecs, norms +
RoPE, attention over the cache, o matvec, gate/up + SwiGLU, down, cache writes; plus the LM
head timed alone and the Python graph building. "the rest" is the pipelined step minus those:
embedding, final norm, log-softmax, argmax, MLX's scheduling between the ~125 operations.
Works for llama-style models (self_attn / mlp / norms attribute names).
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
    from engine.quant.cpu import kernels

    loaded = engine.load(model_path)
    model = loaded.model
    use_blas_prefill(model)  # the CPU paths generation uses (engine/quant/cpu.py)
    cache = model.make_cache()
    ids = mx.array([[(i * 7) % 1000 + 100 for i in range(context)]])
    model(ids, cache=cache)
    mx.eval([c.state for c in cache])
    tok = mx.array([[42]])

    def step():
        y = mx.argmax(model(tok, cache=cache)[:, -1, :], axis=-1)
        for c in cache:
            c.trim(1)  # keep the cache length fixed
        return y

    rows = [("decode step, evaluated alone", _time(step, iters), _nbytes(model))]
    k = kernels()
    if k is not None and hasattr(k, "set_decode_profiling"):
        k.set_decode_profiling(True)
    y = step()
    mx.async_eval(y)
    t = time.perf_counter()
    for _ in range(iters):
        nxt = step()
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    piped = (time.perf_counter() - t) / iters * 1000
    stages = k.decode_profile() if k is not None and hasattr(k, "decode_profile") else {}
    if stages:
        k.set_decode_profiling(False)
    rows.append(("decode step, pipelined (as generation runs)", piped, _nbytes(model)))

    inner = model.model
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    n_layers = len(inner.layers)
    kv_bytes = sum(
        c.keys[..., :context, :].nbytes + c.values[..., :context, :].nbytes for c in cache
    )
    stage_bytes = {
        "q/k/v matvecs": n_layers
        * sum(_nbytes(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)),
        "attention": kv_bytes,
        "o matvec + residual": n_layers * _nbytes(attn.o_proj),
        "gate/up matvecs + SwiGLU": n_layers * (_nbytes(mlp.gate_proj) + _nbytes(mlp.up_proj)),
        "down matvec + residual": n_layers * _nbytes(mlp.down_proj),
    }
    # per token: the clocks ran over iters + 1 steps
    stage_ms = {name: ms / (iters + 1) for name, ms in stages.items()}
    for name, ms in stage_ms.items():
        rows.append((f"  {name} x{n_layers}", ms, stage_bytes.get(name, 0)))
    head = inner.embed_tokens.as_linear if "lm_head" not in model else model.lm_head
    head_bytes = _nbytes(inner.embed_tokens if "lm_head" not in model else model.lm_head)
    x = mx.random.normal((1, 1, loaded.config["hidden_size"]))
    head_ms = _time(lambda: head(x), iters)
    rows.append(("  LM head (alone)", head_ms, head_bytes))
    t = time.perf_counter()
    for _ in range(iters):
        step()  # graph only, never evaluated
    build_ms = (time.perf_counter() - t) / iters * 1000
    rest = piped - sum(stage_ms.values()) - head_ms
    rows.append(("  the rest (embedding, final norm, sampling, scheduling)", rest, 0))
    rows.append(("building the graph in Python (overlaps the step)", build_ms, 0))
    where = f"{k.simd()}, {k.num_threads()} threads" if k is not None else "not loaded"
    print(
        f"openblas: {openblas_loaded()}, CPU kernels: {where}, model {model_path}, cache {context} tokens"
    )
    return rows


def report(rows: list[tuple[str, float, int]]) -> str:
    full = rows[1][1]  # the pipelined step: what generation pays
    lines = [
        "| piece | ms per token | share of pipelined step | MiB read | GB/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, ms, nbytes in rows:
        gbs = nbytes / (ms / 1000) / 1e9 if ms > 0 and nbytes else 0
        lines.append(
            f"| {name} | {ms:.2f} | {100 * ms / full:.0f}% | {nbytes / 2**20:.1f} | {gbs:.1f} |"
        )
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

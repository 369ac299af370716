"""`latent inspect [MODEL]`: what a model stores, one prompt looked at, and a math check.

Without flags: bytes by part, attention bytes per head and the KV cache per token beside full
per-head K/V. `--tensors` lists every tensor; `--look` runs `--prompt` and prints the top next
tokens, residual norms per layer, router choices (MoE) and each head's strongest attention for
the last token; `--check-math` prints the per-layer engine-vs-float64-reference table, ends with
the overall max abs difference, and exits 2 when it exceeds the tolerance for the model's dtype.
This module only formats; the work is engine/inspect.py's.
"""

from __future__ import annotations

import argparse

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="what a model stores; check its math against numpy")
    p.add_argument(
        "model", nargs="?", help="model folder, .gguf or repo id (default: the default model)"
    )
    p.add_argument("--tensors", action="store_true", help="list every stored tensor")
    p.add_argument(
        "--look", action="store_true", help="attention, routing, norms and next tokens on --prompt"
    )
    p.add_argument(
        "--check-math", action="store_true", help="compare every layer with a float64 numpy forward"
    )
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    p.add_argument("--dtype", help="float32 | float16 | bfloat16 (default: the device's)")
    p.add_argument("--tolerance", type=float, help="relative tolerance for --check-math")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=run)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def run(args: argparse.Namespace) -> int:
    import engine
    from app.commands.generate import resolve_model
    from engine import inspect as ins

    loaded = engine.load(resolve_model(args.model), dtype=args.dtype)
    print(
        f"{loaded.info.name}: {loaded.info.model_type}, {loaded.info.n_params:,} parameters, "
        f"{loaded.info.quantization or loaded.info.dtype}"
    )
    if not (args.check_math or args.look) or args.tensors:
        st = ins.storage(loaded)
        if args.tensors:
            for r in st.rows:
                print(
                    f"{r.name:<56} {'x'.join(map(str, r.shape)):>18} {r.format:>28} {r.bytes:>12,} {r.part}"
                )
        for part, b in st.totals.items():
            if b:
                print(f"{part:<12}{_mib(b):>16}")
        print(f"{'total':<12}{_mib(st.total_bytes):>16}")
        print(
            f"attention per head: {st.attention_bytes_per_head / 1024:,.1f} KiB "
            f"({st.n_layers} layers x {st.n_heads} heads)"
        )
        print(
            f"KV cache per token: {st.kv_bytes_per_token:,} B ({st.kv_kind}); "
            f"full per-head K/V would be {st.kv_bytes_per_token_full:,} B "
            f"({st.kv_bytes_per_token_full / max(1, st.kv_bytes_per_token):.1f}x)"
        )
    if args.look:
        lk = ins.look(loaded, args.prompt, top_k=args.top_k)
        print("tokens:", " | ".join(repr(t) for t in lk.tokens))
        print("next token:", ", ".join(f"{t!r} {p:.3f}" for _, t, p in lk.top_next))
        print(
            "residual norm (last token) per layer:",
            " ".join(f"{x:.1f}" for x in lk.residual_norms[:, -1]),
        )
        for i, p in enumerate(lk.attention):
            best = [f"h{h}->{lk.tokens[int(np.argmax(p[h, -1]))]!r}" for h in range(p.shape[0])]
            print(f"layer {i} attention of the last token: {' '.join(best)}")
        for layer, (ids, _w) in sorted(lk.router.items()):
            print(
                f"layer {layer} experts per token: "
                + " ".join("/".join(str(e) for e in row) for row in ids.tolist())
            )
    if args.check_math:
        report = ins.check_math(loaded, args.prompt, tolerance=args.tolerance)
        print(report.table())
        return 0 if report.ok else 2
    return 0

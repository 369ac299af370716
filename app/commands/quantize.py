"""`latent quantize MODEL --format {fp8,q8,q4} [--group-size N] --out DIR`.

Loads MODEL (folder, .gguf or repo id), widens its weights to float32, writes them in the chosen
format as a folder `engine.load` reads (config.json with the quantization, model.safetensors,
tokenizer files), reloads that folder and reports the size change next to the perplexity change
on a text (`--text-file`, else a bundled paragraph). The work lives in engine.quant.convert.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import QuantError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="convert a model to fp8 / 8-bit / 4-bit weights")
    p.add_argument("model", help="model folder, .gguf file or Hub repo id")
    p.add_argument("--format", "-f", required=True, choices=("fp8", "q8", "q4"))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="affine group size for q8/q4 (default 64)")  # fmt: skip
    p.add_argument("--out", "-o", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--text-file", help="text to measure perplexity on (default: a bundled paragraph)"
    )
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    import engine
    from engine.quant import convert

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise QuantError(f"{out}: output folder exists and is not empty")
    text = Path(args.text_file).read_text() if args.text_file else convert.DEFAULT_TEXT
    src = engine.load(args.model, dtype="float32")
    if src.tokenizer is None:
        raise QuantError(f"{src.path}: no tokenizer next to the weights; cannot score a text")
    ids = src.tokenizer.encode(text)[:512]
    ppl0 = convert.perplexity(src.model, ids)
    weights = convert.float_weights(src.model)
    tensors, fp8_keys, qcfg = convert.quantize_weights(
        src.model, weights, args.format, args.group_size
    )
    del weights
    size = convert.write_folder(
        out, src.config, tensors, fp8_keys, qcfg, src.tokenizer, Path(src.path)
    )
    src_bytes, src_params = src.info.weight_bytes, src.info.n_params
    del src, tensors
    mx.clear_cache()
    dst = engine.load(out, dtype="float32")
    ppl1 = convert.perplexity(dst.model, ids)
    print(f"wrote {out} ({args.format}{'' if args.format == 'fp8' else f' g{args.group_size}'})")
    fp32 = 4 * src_params
    print(f"  weights in memory: source {_mb(src_bytes)}, fp32 {_mb(fp32)} -> {_mb(dst.info.weight_bytes)} "
          f"({dst.info.weight_bytes / fp32:.0%} of fp32); file {_mb(size)}; "
          f"{dst.info.weight_bytes / max(src_params, 1):.2f} bytes/param")  # fmt: skip
    print(f"  perplexity on {len(ids)} tokens: {ppl0:.3f} -> {ppl1:.3f} ({(ppl1 / ppl0 - 1):+.2%})")
    sys.stdout.flush()
    return 0

"""Quantization benchmark: bytes per parameter of each format, dequantization throughput of the
references vs the kernels (the kernels only where Metal or CUDA runs), and decode tokens/s of
SmolLM2-135M stored as fp32 / q8 / q4 / fp8 (fp8 per-call and cached) / the shipped GGUF Q4_1.

    .venv/bin/python bench/kernels.py                    # everything (CPU: ~3 min on 2 cores)
    .venv/bin/python bench/kernels.py --only dequant     # just the GB/s table
    .venv/bin/python bench/kernels.py --only cpu         # our CPU kernels vs MLX's CPU ops
    .venv/bin/python bench/kernels.py --json out.json    # also write the numbers

On a Mac the same command measures the Metal kernels (MLX picks the GPU by default); on an
NVIDIA machine with mlx-cuda, bench/device_check.sh runs it after the CUDA tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.blas import maybe_reexec_with_openblas, openblas_loaded  # noqa: E402

if __name__ == "__main__":
    maybe_reexec_with_openblas()  # same BLAS the app uses (no-op where absent)

import mlx.core as mx  # noqa: E402
from latent_kernels._common import backend  # noqa: E402


def _time(fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() with its outputs evaluated."""
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def bytes_per_param() -> list[dict]:
    """Measured on a 1024 x 1024 matrix in each format, as held in memory."""
    from engine.quant.affine import quantize_affine
    from engine.quant.fp8 import quantize_fp8_blocks

    n = k = 1024
    w = mx.random.normal((n, k))
    rows = [
        {"format": "fp32", "bytes_per_param": 4.0},
        {"format": "bf16 (mlx-lm's fp8 load)", "bytes_per_param": 2.0},
    ]
    codes, scales = quantize_fp8_blocks(w)
    rows.append(
        {
            "format": "fp8 e4m3 + 128x128 f32 scales",
            "bytes_per_param": (codes.nbytes + scales.nbytes) / w.size,
        }
    )
    for bits in (8, 4):
        for g in (32, 64, 128):
            q, s, b = quantize_affine(w, g, bits, scale_dtype=mx.float16)
            rows.append({"format": f"affine {bits}-bit g{g} (fp16 scale+bias)",
                         "bytes_per_param": (q.nbytes + s.nbytes + b.nbytes) / w.size})  # fmt: skip
    # GGUF blocks on disk, and as MLX holds them (every block gets a bias, scales fp16)
    for name, disk, bits in (("Q4_0", 18 / 32, 4), ("Q4_1", 20 / 32, 4), ("Q8_0", 34 / 32, 8)):
        rows.append({"format": f"GGUF {name} on disk / in MLX",
                     "bytes_per_param": f"{disk:.4f} / {bits / 8 + 4 / 32:.4f}"})  # fmt: skip
    return rows


def dequant_throughput(n: int = 4096, k: int = 4096) -> list[dict]:
    """GB/s = (bytes read + bytes written) / median time, for each path that runs here."""
    from latent_kernels.affine_dequant import affine_dequant_kernel, affine_dequant_ref
    from latent_kernels.fp8_dequant import fp8_dequant_kernel, fp8_dequant_ref
    from latent_kernels.fp8_matvec import fp8_matvec_kernel, fp8_matvec_ref

    from engine.quant.affine import quantize_affine
    from engine.quant.fp8 import dequant_fp8_cpu, quantize_fp8_blocks

    which = backend()
    w = mx.random.normal((n, k))
    codes, scales = quantize_fp8_blocks(w)
    x = mx.random.normal((k,))
    mx.eval(codes, scales, x)
    rows = []

    def add(name: str, path: str, fn, nbytes: int) -> None:
        t = _time(fn)
        rows.append(
            {"op": name, "path": path, "ms": round(t * 1e3, 3), "GB/s": round(nbytes / t / 1e9, 2)}
        )

    out16 = n * k * 2
    add("fp8 -> fp16", "reference (MLX ops)", lambda: fp8_dequant_ref(codes, scales), n * k + out16)
    add(
        "fp8 -> fp32",
        "CPU path (from_fp8 + block scale)",
        lambda: dequant_fp8_cpu(codes, scales, (128, 128), mx.float32),
        n * k * 5,
    )
    if which != "cpu":
        add(
            "fp8 -> fp16",
            f"{which} kernel",
            lambda: fp8_dequant_kernel(codes, scales, backend=which),
            n * k + out16,
        )
    for bits in (4, 8):
        q, s, b = quantize_affine(w, 64, bits, scale_dtype=mx.float16)
        mx.eval(q, s, b)
        nb = q.nbytes + s.nbytes + b.nbytes + out16
        add(
            f"affine {bits}-bit -> fp16",
            "reference (MLX ops)",
            lambda q=q, s=s, b=b, bits=bits: affine_dequant_ref(q, s, b, 64, bits),
            nb,
        )
        add(
            f"affine {bits}-bit -> fp16",
            "mx.dequantize",
            lambda q=q, s=s, b=b, bits=bits: mx.dequantize(q, s, b, 64, bits).astype(mx.float16),
            nb,
        )
        if which != "cpu":
            add(f"affine {bits}-bit -> fp16", f"{which} kernel",
                lambda q=q, s=s, b=b, bits=bits: affine_dequant_kernel(q, s, b, 64, bits, backend=which), nb)  # fmt: skip
    add(
        "fp8 matvec",
        "reference (dequant + matmul)",
        lambda: fp8_matvec_ref(codes, scales, x),
        n * k + 4 * k,
    )
    if which != "cpu":
        add(
            "fp8 matvec",
            f"{which} fused kernel",
            lambda: fp8_matvec_kernel(codes, scales, x, backend=which),
            n * k + 4 * k,
        )
    return rows


def memory_vs_mlx_lm(workdir: Path | None = None) -> list[dict]:
    """A DeepSeek-V3-shaped fp8 checkpoint (random, written here) loaded by engine.load and by
    mlx-lm 0.32 (which widens fp8 to bf16 in its sanitize): bytes of parameters held."""
    import numpy as np
    import torch
    import transformers.utils as tu
    import transformers.utils.import_utils as iu

    tu.is_kernels_available = iu.is_kernels_available = lambda *a, **k: False
    import transformers as tf
    from mlx.utils import tree_flatten

    import engine
    from engine.quant import quantize_fp8_blocks, save_safetensors

    folder = Path(workdir or tempfile.mkdtemp(prefix="latent-bench-ds3-")) / "ds3-fp8"
    if not (folder / "model.safetensors").exists():
        cfg = tf.DeepseekV3Config(
            vocab_size=1024, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=256,
            q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
            n_group=1, topk_group=1, max_position_embeddings=512, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        model = tf.DeepseekV3ForCausalLM(cfg)
        tensors, fp8 = {}, set()

        def put(key: str, w) -> None:
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(mx.array(w))
            fp8.add(key)

        for name, t in model.state_dict().items():
            w = t.detach().float().numpy()
            if name.endswith("experts.gate_up_proj"):
                half = w.shape[1] // 2
                for e in range(w.shape[0]):
                    put(f"{name[:-12]}{e}.gate_proj.weight", w[e, :half])
                    put(f"{name[:-12]}{e}.up_proj.weight", w[e, half:])
            elif name.endswith("experts.down_proj"):
                for e in range(w.shape[0]):
                    put(f"{name[:-9]}{e}.down_proj.weight", w[e])
            elif (
                name.startswith("model.layers.")
                and w.ndim == 2
                and "norm" not in name
                and not name.endswith("mlp.gate.weight")
            ):
                put(name, w)
            else:
                tensors[name] = mx.array(w.astype(np.float32)).astype(mx.bfloat16)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(folder / "model.safetensors", tensors, fp8)
        conf = cfg.to_dict() | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                        "weight_block_size": [128, 128]}}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(conf))
    ours = engine.load(folder, dtype="bfloat16")
    ours_bytes = sum(v.nbytes for _, v in tree_flatten(ours.model.parameters()))
    del ours
    from mlx_lm.utils import load_model

    theirs, _ = load_model(folder)
    theirs_bytes = sum(v.nbytes for _, v in tree_flatten(theirs.parameters()))
    return [
        {"loader": "mlx-lm 0.32 (fp8 -> bf16)", "param MB": round(theirs_bytes / 1e6, 1), "ratio": 1.0},
        {"loader": "engine.load (fp8 kept)", "param MB": round(ours_bytes / 1e6, 1),
         "ratio": round(ours_bytes / theirs_bytes, 3)},
    ]  # fmt: skip


def _decode_tps(folder: Path, prompt_ids: list[int], tokens: int, cache_fp8: bool = False) -> dict:
    import engine
    from engine.generate import stream_generate
    from engine.quant.fp8 import Fp8Linear
    from engine.sampling import SamplingParams

    Fp8Linear.cache_dequantized = cache_fp8
    mx.clear_cache()
    mx.reset_peak_memory()
    loaded = engine.load(folder, dtype="float32")
    weight_bytes = loaded.info.weight_bytes
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    stats = None
    for ev in stream_generate(loaded, prompt_ids, params):
        if ev.done:
            stats = ev.stats
    Fp8Linear.cache_dequantized = None
    resident = mx.get_active_memory()
    del loaded
    return {
        "decode tok/s": round(stats.decode_tps, 2),
        "prefill tok/s": round(stats.prefill_tps, 1),
        "weights MB": round(weight_bytes / 1e6, 1),
        "active MB after run": round(resident / 1e6, 1),
        "generated": stats.generated_tokens,
    }


def decode_speed(tokens: int = 48, workdir: Path | None = None) -> list[dict]:
    """SmolLM2-135M in each format, converted from the shipped GGUF by engine.quant.convert."""
    import engine
    from engine.defaults import ensure_default_model
    from engine.quant import convert

    src_path = ensure_default_model(progress=lambda *a: None)
    work = Path(workdir or tempfile.mkdtemp(prefix="latent-bench-quant-"))
    src = engine.load(src_path, dtype="float32")
    prompt = src.tokenizer.encode(convert.DEFAULT_TEXT)[:64]
    weights = convert.float_weights(src.model)
    folders = {"GGUF Q4_1 (shipped)": src_path}
    for fmt in ("fp32", "q8", "q4", "fp8"):
        out = work / fmt
        if not (out / "model.safetensors").exists():
            if fmt == "fp32":
                tensors, fp8_keys, qcfg = weights, set(), {}
            else:
                tensors, fp8_keys, qcfg = convert.quantize_weights(src.model, weights, fmt, 64)
            convert.write_folder(
                out, src.config, tensors, fp8_keys, qcfg, src.tokenizer, Path(src.path)
            )
        folders[fmt if fmt != "q8" and fmt != "q4" else f"{fmt} g64"] = out
    del src, weights
    rows = []
    for name, folder in folders.items():
        rows.append({"model": name, **_decode_tps(Path(folder), prompt, tokens)})
        if name == "fp8":
            rows.append(
                {
                    "model": "fp8, cached fp32 copy",
                    **_decode_tps(Path(folder), prompt, tokens, True),
                }
            )
    return rows


def cpu_kernels() -> list[dict]:
    """Our CPU kernels (latent_kernels.cpu) vs the MLX ops they replace, on SmolLM2-135M shapes,
    alternating within one process; the kernels at 1 thread and at this machine's default."""
    from latent_kernels import cpu

    k = cpu.load()
    if k is None:
        return [{"op": f"CPU kernels not built: {cpu.load_error()}"}]
    mx.random.seed(0)
    rows = []
    default_threads = k.num_threads()

    def add(op: str, mlx_fn, ours_fn, nbytes: int) -> None:
        t_mlx = _time(mlx_fn, repeat=9)
        row = {"op": op, "MLX ms": f"{t_mlx * 1e3:.3f}"}
        for n in sorted({1, default_threads}):
            k.set_num_threads(n)
            t = _time(ours_fn, repeat=9)
            row[f"ours {n}T ms"] = f"{t * 1e3:.3f}"
            row[f"ours {n}T speed-up"] = f"{t_mlx / t:.1f}x"
        k.set_num_threads(default_threads)
        if nbytes:
            row["ours GB/s"] = f"{nbytes / t / 1e9:.1f}"
        rows.append(row)

    def quantized(n: int, kk: int, bits: int):
        w, s, b = mx.quantize(mx.random.normal((n, kk)), 32, bits)
        mx.eval(w, s, b)
        return w, s, b, w.nbytes + s.nbytes + b.nbytes

    def qmm(x, w, s, b, bits):
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=bits)

    w4, s4, b4, n4 = quantized(1536, 576, 4)
    w8, s8, b8, n8 = quantized(49152, 576, 8)
    x1, x4 = mx.random.normal((1, 576)), mx.random.normal((4, 576))
    add("Q4 matvec 1536x576 (MLP)", lambda: qmm(x1, w4, s4, b4, 4),
        lambda: k.qmm_rows(x1, w4, s4, b4, 32, 4), n4)  # fmt: skip
    add("Q4 1536x576, 4 rows (draft check / batch)", lambda: qmm(x4, w4, s4, b4, 4),
        lambda: k.qmm_rows(x4, w4, s4, b4, 32, 4), n4)  # fmt: skip
    add("Q8 matvec 49152x576 (tied LM head)", lambda: qmm(x1, w8, s8, b8, 8),
        lambda: k.qmm_rows(x1, w8, s8, b8, 32, 8), n8)  # fmt: skip
    add("dequantize Q4 1536x576 to fp32", lambda: mx.dequantize(w4, s4, b4, 32, 4),
        lambda: k.dequantize_f32(w4, s4, b4, 32, 4), 0)  # fmt: skip
    q = mx.random.normal((1, 9, 512, 64))
    kv = mx.random.normal((1, 3, 512, 64))
    mx.eval(q, kv)
    add(
        "causal attention, 512-token chunk (9 q / 3 kv heads)",
        lambda: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.125, mask="causal"),
        lambda: k.attention(q, kv, kv, 0.125, True),
        0,
    )
    q1 = q[:, :, :1]
    add(
        "attention, 1 token over 512 cached",
        lambda: mx.fast.scaled_dot_product_attention(q1, kv, kv, scale=0.125),
        lambda: k.attention(q1, kv, kv, 0.125, False),
        0,
    )
    g, u = mx.random.normal((1, 512, 1536)), mx.random.normal((1, 512, 1536))
    mx.eval(g, u)
    add("SwiGLU 512x1536", lambda: g * mx.sigmoid(g) * u, lambda: k.swiglu(g, u), 0)
    from engine.layers.rope import default_periods

    per = default_periods(64, 100000.0)
    add(
        "RoPE, one token (9 heads x 64)",
        lambda: mx.fast.rope(
            q1, 64, traditional=False, base=None, scale=1.0, offset=700, freqs=per
        ),  # fmt: skip
        lambda: k.rope(q1, 64, False, per, 1.0, 700),
        0,
    )
    h, wn = mx.random.normal((1, 1, 576)), mx.random.normal((576,))
    add("RMSNorm, one token (576)", lambda: mx.fast.rms_norm(h, wn, 1e-5),
        lambda: k.rms_norm(h, wn, 1e-5), 0)  # fmt: skip
    logits = mx.random.normal((1, 49152))
    add("log-softmax of one step's logits (49,152)",
        lambda: logits - mx.logsumexp(logits, axis=-1, keepdims=True),
        lambda: k.log_softmax(logits), 0)  # fmt: skip
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("bytes", "dequant", "cpu", "memory", "decode"))
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--size", type=int, default=4096, help="dequant matrix side (default 4096)")
    p.add_argument("--workdir", help="where converted models are kept between runs")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    print(f"backend: {backend()}; mlx {mx.__version__}; OpenBLAS preloaded: {openblas_loaded()}; "
          f"cores: {os.cpu_count()}")  # fmt: skip
    results = {}
    if args.only in (None, "bytes"):
        results["bytes_per_param"] = bytes_per_param()
        _print_table("Bytes per parameter", results["bytes_per_param"])
    if args.only in (None, "dequant"):
        results["dequant"] = dequant_throughput(args.size, args.size)
        _print_table(f"Dequantization, {args.size}x{args.size}", results["dequant"])
    if args.only in (None, "cpu"):
        results["cpu"] = cpu_kernels()
        _print_table(
            "CPU kernels vs the MLX ops they replace (SmolLM2-135M shapes)", results["cpu"]
        )
    if args.only in (None, "memory"):
        results["memory"] = memory_vs_mlx_lm(Path(args.workdir) if args.workdir else None)
        _print_table("fp8 DeepSeek-V3-shaped checkpoint: parameter bytes held", results["memory"])
    if args.only in (None, "decode"):
        results["decode"] = decode_speed(args.tokens, Path(args.workdir) if args.workdir else None)
        _print_table("Decode, SmolLM2-135M", results["decode"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Use an optimised BLAS for MLX's CPU matmuls on Linux.

MLX's Linux wheel links the reference BLAS; Debian's OpenBLAS exports the same CBLAS symbols,
so preloading it (LD_PRELOAD) makes MLX's fp32 GEMM ~11x and matvec ~4.6x faster here
(FACTS.md). LD_PRELOAD only takes effect at process start, so `maybe_reexec_with_openblas()`
re-executes the current command once with it set, before MLX does any work. Set
`LATENT_NO_OPENBLAS=1` to turn it off.

Once a fast GEMM is there, prompt prefill should use it: MLX-CPU's quantized matmul runs a
512-token chunk as 512 matvecs (~1.1 s for one 576x1536 layer here), while dequantizing the
block to fp32 and calling sgemm takes ~0.07 s. `use_blas_prefill(model)` hands quantized layers
to engine/quant/cpu.py, which does that for prompt chunks and runs one-token decode through our
own SIMD kernels (latent_kernels.cpu).
`dequantize_model` widens a model's quantized layers to plain fp32 ones (benchmarks, export).
Module import stays free of mlx (the re-exec must happen before MLX loads).
"""

from __future__ import annotations

import functools
import os
import platform
import sys

DISABLE_ENV = "LATENT_NO_OPENBLAS"
# Set in the re-executed child so a failed preload can never loop.
REEXEC_ENV = "LATENT_OPENBLAS_REEXEC"


def openblas_candidates() -> list[str]:
    arch = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine())
    if not arch:
        return []
    base = f"/usr/lib/{arch}-linux-gnu"
    return [f"{base}/openblas-pthread/libopenblas.so.0", f"{base}/libopenblas.so.0"]


def openblas_path() -> str | None:
    """The first Debian OpenBLAS library present on this machine, or None."""
    for path in openblas_candidates():
        if os.path.exists(path):
            return path
    return None


@functools.cache
def openblas_loaded() -> bool:
    """Whether an OpenBLAS library is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return False


def reexec_command() -> list[str]:
    # orig_argv keeps `-m module` / `-c code` forms intact; argv[0] becomes this interpreter.
    return [sys.executable, *sys.orig_argv[1:]]


def maybe_reexec_with_openblas() -> None:
    """Re-exec this process once with OpenBLAS preloaded, when useful and allowed.

    Does nothing off Linux, when `LATENT_NO_OPENBLAS` is set, when already re-executed, when
    LD_PRELOAD already names an OpenBLAS, or when none is installed.
    """
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get(DISABLE_ENV) or os.environ.get(REEXEC_ENV):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return
    lib = openblas_path()
    if lib is None:
        return
    env = dict(os.environ)
    env[REEXEC_ENV] = "1"
    env["LD_PRELOAD"] = f"{lib} {preload}".strip()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, reexec_command(), env)
    except OSError:
        return  # could not re-exec: carry on with the reference BLAS


# --- quantized layers on the CPU --------------------------------------------------------------


def use_blas_prefill(model, force: bool = False) -> int:
    """Route quantized layers through our CPU kernels and, for prompt chunks, OpenBLAS GEMM.

    Kept under its old name for the generation loops; the logic lives in engine/quant/cpu.py.
    """
    from engine.quant.cpu import use_cpu_kernels

    return use_cpu_kernels(model, force=force)


def dequantize_model(model) -> int:
    """Replace quantized linears/embeddings by fp32 `nn.Linear`/`nn.Embedding`; returns count."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    new = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            continue
        w = mx.dequantize(
            m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=m.mode
        ).astype(mx.float32)
        if isinstance(m, nn.QuantizedEmbedding):
            layer = nn.Embedding(w.shape[0], w.shape[1])
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                layer.bias = m["bias"].astype(mx.float32)
        layer.weight = w
        new.append((path, layer))
    if new:
        model.update_modules(tree_unflatten(new))
        mx.eval(model.parameters())
    return len(new)

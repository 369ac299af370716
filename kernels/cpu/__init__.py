"""CPU kernels for MLX's affine-quantized weights (a C++ MLX extension built on this machine).

MLX's CPU backend runs `quantized_matmul` single-threaded without SIMD (0.3-0.9 GB/s of weights
on the build machine) and `dequantize` at ~0.1-0.2 G elements/s, so one-token decoding and
prompt prefill of 4/8-bit models were bound by those two ops. `qmatmul.cpp` defines two MLX
primitives that replace them on the CPU (AVX2/FMA where the CPU has it, portable loops
elsewhere, rows split over a small thread pool):

    qmm_rows(x, w, scales, biases, group_size, bits)  # x @ dequantize(w).T, float32, few rows
    dequantize_f32(w, scales, biases, group_size, bits)  # (N, K) float32

The extension is compiled once per machine (g++ + nanobind + MLX's bundled headers, ~1 min)
into the user cache, keyed by the source, MLX, nanobind and Python versions; `make test`
builds it ahead. `load()` returns the module, or None with `load_error()` saying why (no
compiler, not Linux/macOS, a failed build): callers then keep MLX's own ops. The reference is
`mx.dequantize` / `mx.quantized_matmul` (tests/test_cpu_kernels.py compares against both and
against numpy float64). Set `LATENT_NO_CPU_KERNELS=1` to turn the kernels off.
"""

from __future__ import annotations

from .extension import DISABLE_ENV, build, load, load_error

__all__ = ["DISABLE_ENV", "build", "load", "load_error"]

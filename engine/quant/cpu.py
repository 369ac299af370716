"""What runs on our CPU kernels (latent_kernels.cpu) instead of MLX's CPU ops, and when.

`cpu_kernels_for(*arrays)` is the one test every caller uses (MLX on the CPU, float32, kernels
built); engine/layers call it for attention, RoPE, RMSNorm and SwiGLU, the generation loops
through `log_softmax`. The rest of this module is how affine-quantized layers compute on the
CPU: our kernels, then OpenBLAS, then MLX.

MLX's CPU `quantized_matmul` is single-threaded scalar code (0.3-0.9 GB/s of weights here), and
one-token decoding is nothing but such matvecs. `use_cpu_kernels(model)` switches every
eligible `nn.QuantizedLinear` / `nn.QuantizedEmbedding` (affine, 4 or 8 bits, groups of a
multiple of 32, float32 activations) to a subclass that computes, by number of input rows:

- fewer than `PREFILL_MIN_ROWS` (decode, draft verification, small batches): the SIMD,
  multi-threaded `qmm_rows` kernel of `latent_kernels.cpu` (each weight group unpacked once
  for all rows);
- more (prompt chunks): dequantize to float32 (our kernel, else `mx.dequantize`) and one GEMM,
  which is fast when OpenBLAS is loaded (engine/blas.py); without OpenBLAS MLX's reference GEMM
  is slower than `qmm_rows`, which then takes every size.

Anything else (a GPU, fp16 activations, another mode or bit width, the kernels not built) keeps
MLX's own ops. Parameters, names and saved files do not change: only the method that runs a
call does (the instance's class is swapped, and swapped back by `restore`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# from here on, dequantize + OpenBLAS sgemm beats qmm_rows (measured crossover: 12-16 rows)
PREFILL_MIN_ROWS = 12


_KERNELS: list = []  # [module or None] once looked up


def kernels():
    """The compiled kernel module, or None (see `latent_kernels.cpu.load_error()`)."""
    if not _KERNELS:
        from latent_kernels import cpu

        _KERNELS.append(cpu.load())
    return _KERNELS[0]


def cpu_kernels_for(*arrays: mx.array):
    """The kernel module when MLX computes on the CPU and every array is float32, else None."""
    if mx.default_device() != mx.cpu or any(a.dtype != mx.float32 for a in arrays):
        return None
    return kernels()


def log_softmax(logits: mx.array) -> mx.array:
    """logits - logsumexp(logits) over the last axis (our kernel on the CPU: ~10x MLX's there)."""
    kern = cpu_kernels_for(logits)
    if kern is not None:
        return kern.log_softmax(logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _eligible(m: nn.Module) -> bool:
    return (
        getattr(m, "mode", "affine") == "affine"
        and m.bits in (4, 8)
        and m.group_size % 32 == 0
        and m["weight"].ndim == 2
        and m.get("biases") is not None
    )


def _dequantized(m: nn.Module, k) -> mx.array:
    if k is not None:
        return k.dequantize_f32(m["weight"], m["scales"], m["biases"], m.group_size, m.bits)
    w = mx.dequantize(m["weight"], m["scales"], m["biases"], m.group_size, m.bits)
    return w.astype(mx.float32)


def quantized_matmul(m: nn.Module, x: mx.array) -> mx.array | None:
    """x @ W.T for a quantized module on the fastest CPU path, or None to use MLX's op."""
    if mx.default_device() != mx.cpu or x.dtype != mx.float32:
        return None
    k = kernels()
    rows = x.size // x.shape[-1]
    if rows >= PREFILL_MIN_ROWS and _openblas():
        return x @ _dequantized(m, k).T
    if k is None:
        return None
    return k.qmm_rows(x, m["weight"], m["scales"], m["biases"], m.group_size, m.bits)


def _openblas() -> bool:
    from engine.blas import openblas_loaded

    return openblas_loaded()


class CpuQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        y = quantized_matmul(self, x)
        return super().as_linear(x) if y is None else y


def linear_parts(m: nn.Module) -> tuple[list, int, int] | None:
    """([weight, scales, biases, bias], bits, group_size) of a linear layer the fused decode
    kernels run (affine 4/8-bit, or float32 with bits 0; absent parts None), else None: any
    other class (LoRA wrappers included), mode or dtype."""
    bias = m.get("bias")
    if bias is not None and bias.dtype != mx.float32:
        return None
    if type(m) in (nn.QuantizedLinear, CpuQuantizedLinear):
        if not _eligible(m) or m["scales"].dtype not in (mx.float32, mx.float16, mx.bfloat16):
            return None
        return [m["weight"], m["scales"], m["biases"], bias], m.bits, m.group_size
    if type(m) is nn.Linear and m["weight"].dtype == mx.float32:
        return [m["weight"], None, None, bias], 0, 0
    return None


_SWAP = {nn.QuantizedLinear: CpuQuantizedLinear, nn.QuantizedEmbedding: CpuQuantizedEmbedding}


def use_cpu_kernels(model: nn.Module, force: bool = False) -> int:
    """Switch eligible quantized layers to the CPU paths above; returns how many changed.

    Only when MLX computes on the CPU (or `force`), and only if the kernels load or OpenBLAS is
    there (otherwise nothing would be faster). Idempotent; cheap enough to call per generation.
    """
    if not force and mx.default_device() != mx.cpu:
        return 0
    if kernels() is None and not _openblas():
        return 0
    n = 0
    for _, m in model.named_modules():
        new = _SWAP.get(type(m))
        if new is not None and _eligible(m):
            m.__class__ = new
            n += 1
    return n


def restore(model: nn.Module) -> int:
    """Undo `use_cpu_kernels` (MLX's own ops again); returns how many changed back."""
    back = {v: k for k, v in _SWAP.items()}
    n = 0
    for _, m in model.named_modules():
        old = back.get(type(m))
        if old is not None:
            m.__class__ = old
            n += 1
    return n

"""MLX affine int2/int4/int8 weights → fp16/fp32 (also GGUF Q4_0/Q4_1/Q8_0 as MLX loads them).

`affine_dequant_ref` is the spec and the oracle; the Metal body and its CUDA twin compute the
same thing one element per thread and must agree with it bit for bit (the shim checks the Metal
body on the CPU). `dequant_affine` picks the kernel on a GPU and the reference elsewhere.
Widths that straddle uint32 words (3, 5, 6 bits) are left to `mx.dequantize`.
"""

from __future__ import annotations

import mlx.core as mx

from ._common import E4M3_CUDA, KernelSource, Launch, pick, run

KERNEL_BITS = (2, 4, 8)


def affine_dequant_ref(
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    bits: int = 4,
    dtype: mx.Dtype = mx.float16,
) -> mx.array:
    """out[r, c] = q[r, c] · scales[r, c//g] + biases[r, c//g], in float32, rounded once to dtype.

    Layout (MLX "affine"): `wq` (N, K·bits/32) uint32; value c sits in word c // (32/bits) at bit
    offset (c % (32/bits))·bits, lowest bits first. `scales`/`biases` (N, K/g), any float dtype.
    Multiply and add are separate float32 roundings (q·scale is exact for fp16/bf16 scales).
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"affine_dequant_ref handles bits in {KERNEL_BITS}, got {bits}")
    per_word = 32 // bits
    n = wq.shape[0]
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    q = (wq[..., None] >> shifts) & ((1 << bits) - 1)  # (N, W, per_word)
    k = wq.shape[-1] * per_word
    q = q.reshape(n, k // group_size, group_size).astype(mx.float32)  # (N, K/g, g)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    return (q * s + b).reshape(n, k).astype(dtype)


def _make_affine_dequant_kernel() -> KernelSource:
    metal = """
    // wq: (N, K*BITS/32) uint32, value c in word c/(32/BITS) at bits (c%(32/BITS))*BITS, low first.
    // scales, biases: (N, K/GS). dims = [N, K]. One thread per output element i = r*K + c.
    uint i = thread_position_in_grid.x;
    uint N = dims[0];
    uint K = dims[1];
    if (i >= N * K) {
        return;
    }
    uint r = i / K;
    uint c = i - r * K;
    const uint per_word = 32 / BITS;
    uint word = wq[r * (K / per_word) + c / per_word];
    uint q = (word >> ((c % per_word) * BITS)) & ((1u << BITS) - 1u);
    uint g = r * (K / GS) + c / GS;
    float prod = float(q) * float(scales[g]);
    float v = prod + float(biases[g]);
    out[i] = static_cast<T>(v);
    """
    cuda = """
    // Same layout as the Metal body; __fmul_rn/__fadd_rn keep nvcc from fusing into an fma.
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned N = dims[0];
    unsigned K = dims[1];
    if (i >= N * K) {
        return;
    }
    unsigned r = i / K;
    unsigned c = i - r * K;
    const unsigned per_word = 32 / BITS;
    unsigned word = wq[r * (K / per_word) + c / per_word];
    unsigned q = (word >> ((c % per_word) * BITS)) & ((1u << BITS) - 1u);
    unsigned g = r * (K / GS) + c / GS;
    float v = __fadd_rn(__fmul_rn(float(q), latent_load(scales[g])), latent_load(biases[g]));
    latent_store(&out[i], v);
    """
    return KernelSource(
        name="latent_affine_dequant",
        input_names=("wq", "scales", "biases", "dims"),
        output_names=("out",),
        metal=metal,
        metal_header="",
        cuda=cuda,
        cuda_header=E4M3_CUDA,  # for latent_store/load_f
    )


AFFINE_DEQUANT = _make_affine_dequant_kernel()


def affine_dequant_launch(
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    bits: int,
    dtype: mx.Dtype,
) -> Launch:
    """Inputs, template, grid and outputs of one affine_dequant call (also used by the shim)."""
    n = wq.shape[0]
    k = wq.shape[-1] * (32 // bits)
    dims = mx.array([n, k], dtype=mx.uint32)
    return Launch(
        inputs=[wq, scales, biases, dims],
        template=[("T", dtype), ("BITS", int(bits)), ("GS", int(group_size))],
        grid=(n * k, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(n, k)],
        output_dtypes=[dtype],
    )


def affine_dequant_kernel(
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    bits: int = 4,
    dtype: mx.Dtype = mx.float16,
    *,
    backend: str = "metal",
) -> mx.array:
    """The Metal or CUDA kernel for `affine_dequant_ref` (needs that backend)."""
    launch = affine_dequant_launch(wq, scales, biases, group_size, bits, dtype)
    return run(AFFINE_DEQUANT, backend, launch)[0]


def dequant_affine(
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    bits: int = 4,
    dtype: mx.Dtype = mx.float16,
    *,
    use_kernel: bool | None = None,
) -> mx.array:
    """Dispatcher: the kernel on Metal/CUDA, the reference on the CPU; odd widths → mx.dequantize."""
    if bits not in KERNEL_BITS:
        return mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(dtype)
    which = pick(use_kernel)
    if which is None:
        return affine_dequant_ref(wq, scales, biases, group_size, bits, dtype)
    return affine_dequant_kernel(wq, scales, biases, group_size, bits, dtype, backend=which)

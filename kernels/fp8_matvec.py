"""Fused fp8 dequant-matvec for one-token decoding: y = W·x with W block-scaled fp8, never
materialising W in a wider type.

Two references: `fp8_matvec_ref` is the spec (x @ dequant(W)ᵀ in plain ops, agreement within
float32 rounding); `fp8_matvec_ordered_ref` adds in the kernel's exact order, so the kernel body
must match it bit for bit. `matvec_fp8` picks the kernel on a GPU and the spec elsewhere.
Only a single vector (decode); prefill goes through dequantize + matmul in `engine.quant`.
"""

from __future__ import annotations

import mlx.core as mx

from ._common import E4M3_CUDA, E4M3_METAL, KernelSource, Launch, pick, run
from .fp8_dequant import e4m3_decode_ref, fp8_dequant_ref

LANES = 32  # one simdgroup (Metal) / warp (CUDA) per output row
PER_LANE = 4  # consecutive columns per lane per step: a step covers 128 columns


def fp8_matvec_ref(
    w: mx.array,
    scale_inv: mx.array,
    x: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float32,
) -> mx.array:
    """y[r] = Σ_c e4m3(w[r, c])·scale_inv[r//BN, c//BK]·x[c], float32 math, result in dtype.

    Layout as `fp8_dequant_ref`: `w` (N, K) uint8, `scale_inv` (ceil(N/BN), ceil(K/BK)) float32,
    `x` (K,). The order of the additions is MLX's; see `fp8_matvec_ordered_ref` for the kernel's.
    """
    wd = fp8_dequant_ref(w, scale_inv, block, mx.float32)
    return (wd @ x.astype(mx.float32)).astype(dtype)


def fp8_matvec_ordered_ref(
    w: mx.array,
    scale_inv: mx.array,
    x: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float32,
) -> mx.array:
    """`fp8_matvec_ref` with the kernel's rounding order, in plain ops (slow; the oracle).

    Lane l of row r keeps a float32 sum: for each step t, for j in 0..3, it adds
    (e4m3(w)·scale)·x at column 128t + 4l + j (product, then scaled product × x, then add).
    The 32 lane sums are then combined by an xor butterfly: offsets 16, 8, 4, 2, 1, each
    `acc = acc + acc[lane ^ offset]`; lane 0's value is the result.
    """
    bn, bk = block
    n, k = w.shape
    s = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), bn, axis=0), bk, axis=1)[:n, :k]
    prod = (e4m3_decode_ref(w) * s) * x.astype(mx.float32)[None, :]  # (N, K)
    step = LANES * PER_LANE
    kp = -(-k // step) * step
    if kp != k:
        prod = mx.concatenate([prod, mx.zeros((n, kp - k), mx.float32)], axis=1)  # +0 adds nothing
    prod = prod.reshape(n, kp // step, LANES, PER_LANE)  # (N, steps, lanes, j)
    acc = mx.zeros((n, LANES), mx.float32)
    for t in range(kp // step):
        for j in range(PER_LANE):
            acc = acc + prod[:, t, :, j]
    lanes = mx.arange(LANES, dtype=mx.uint32)
    for off in (16, 8, 4, 2, 1):
        acc = acc + acc[:, lanes ^ off]
    return acc[:, 0].astype(dtype)


def _make_fp8_matvec_kernel() -> KernelSource:
    metal = """
    // w: (N, K) uint8 e4m3, s: (ceil(N/BN), ceil(K/BK)) float32, x: (K,), dims = [N, K].
    // grid (32, N): the 32 lanes of one simdgroup share row r; per 128-column step lane l reads
    // columns 4l..4l+3 (coalesced), then an xor butterfly adds the 32 partial sums.
    uint lane = thread_position_in_grid.x;
    uint r = thread_position_in_grid.y;
    uint K = dims[1];
    uint nkb = (K + BK - 1) / BK;
    const device uint8_t* wr = w + r * K;
    const device float* sr = s + (r / BN) * nkb;
    float acc = 0.0f;
    for (uint c0 = lane * 4; c0 < K; c0 += 128) {
        for (uint j = 0; j < 4; ++j) {
            uint c = c0 + j;
            if (c < K) {
                float wv = latent_e4m3_to_float(wr[c]) * sr[c / BK];
                float p = wv * float(x[c]);
                acc = acc + p;
            }
        }
    }
    for (ushort off = 16; off > 0; off >>= 1) {
        acc = acc + simd_shuffle_xor(acc, off);
    }
    if (lane == 0) {
        out[r] = static_cast<T>(acc);
    }
    """
    cuda = """
    // Same layout as the Metal body: one warp per row, blockDim = (32, 1, 1).
    unsigned lane = threadIdx.x;
    unsigned r = blockIdx.y * blockDim.y + threadIdx.y;
    unsigned K = dims[1];
    unsigned nkb = (K + BK - 1) / BK;
    const uint8_t* wr = w + (size_t)r * K;
    const float* sr = s + (r / BN) * nkb;
    float acc = 0.0f;
    for (unsigned c0 = lane * 4; c0 < K; c0 += 128) {
        for (unsigned j = 0; j < 4; ++j) {
            unsigned c = c0 + j;
            if (c < K) {
                float wv = __fmul_rn(latent_e4m3_to_float(wr[c]), sr[c / BK]);
                acc = __fadd_rn(acc, __fmul_rn(wv, latent_load(x[c])));
            }
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
    }
    if (lane == 0) {
        latent_store(&out[r], acc);
    }
    """
    return KernelSource(
        name="latent_fp8_matvec",
        input_names=("w", "s", "x", "dims"),
        output_names=("out",),
        metal=metal,
        metal_header=E4M3_METAL,
        cuda=cuda,
        cuda_header=E4M3_CUDA,
        simd=True,
    )


FP8_MATVEC = _make_fp8_matvec_kernel()


def fp8_matvec_launch(
    w: mx.array, scale_inv: mx.array, x: mx.array, block: tuple[int, int], dtype: mx.Dtype
) -> Launch:
    """Inputs, template, grid and outputs of one fp8_matvec call (also used by the shim)."""
    n, k = w.shape
    dims = mx.array([n, k], dtype=mx.uint32)
    return Launch(
        inputs=[w, scale_inv.astype(mx.float32), x.reshape(k), dims],
        template=[("T", dtype), ("BN", int(block[0])), ("BK", int(block[1]))],
        grid=(LANES, n, 1),
        threadgroup=(LANES, 1, 1),
        output_shapes=[(n,)],
        output_dtypes=[dtype],
    )


def fp8_matvec_kernel(
    w: mx.array,
    scale_inv: mx.array,
    x: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float32,
    *,
    backend: str = "metal",
) -> mx.array:
    """The Metal or CUDA kernel for `fp8_matvec_ordered_ref` (needs that backend)."""
    return run(FP8_MATVEC, backend, fp8_matvec_launch(w, scale_inv, x, block, dtype))[0]


def matvec_fp8(
    w: mx.array,
    scale_inv: mx.array,
    x: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float32,
    *,
    use_kernel: bool | None = None,
) -> mx.array:
    """Dispatcher: the fused kernel on Metal/CUDA, the reference on the CPU."""
    which = pick(use_kernel)
    if which is None:
        return fp8_matvec_ref(w, scale_inv, x, block, dtype)
    return fp8_matvec_kernel(w, scale_inv, x, block, dtype, backend=which)

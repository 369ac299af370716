"""fp8 e4m3 weights with 2-D block scales → fp16/fp32 (the DeepSeek-V3 `weight_scale_inv` layout).

`fp8_dequant_ref` is the spec and the oracle; the Metal body and its CUDA twin compute the same
thing one element per thread and must agree with it bit for bit (the shim checks the Metal body
on the CPU). `dequant_fp8` picks the kernel on a GPU and the reference elsewhere.
This file knows the layout only; which layers are fp8 is `engine.quant`'s business.
"""

from __future__ import annotations

import mlx.core as mx

from ._common import E4M3_CUDA, E4M3_METAL, KernelSource, Launch, pick, run


def e4m3_decode_ref(codes: mx.array) -> mx.array:
    """uint8 e4m3fn codes → float32 values, from the bits (plain MLX ops).

    S.EEEE.MMM, bias 7: normal 2^(E-7)·(1+M/8); E=0 subnormal 2^-6·M/8; S.1111.111 NaN; no inf.
    Normal codes become float32 bits directly: exponent E+120, mantissa M<<20 (exact).
    """
    c = codes.astype(mx.uint32)
    s = (c >> 7) & 1
    e = (c >> 3) & 15
    m = c & 7
    sub_bits = (m.astype(mx.float32) * 0.001953125).view(mx.uint32)  # 2^-9·M, exact
    norm_bits = ((e + 120) << 23) | (m << 20)
    bits = mx.where(e == 0, sub_bits, norm_bits)
    bits = mx.where((e == 15) & (m == 7), mx.array(0x7FC00000, mx.uint32), bits)
    return (bits | (s << 31)).view(mx.float32)


def fp8_dequant_ref(
    w: mx.array,
    scale_inv: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float16,
) -> mx.array:
    """Dequantize a block-scaled fp8 matrix: out[r, c] = e4m3(w[r, c]) · scale_inv[r//BN, c//BK].

    Layout: `w` (N, K) uint8 e4m3fn codes, row-major; `scale_inv` (ceil(N/BN), ceil(K/BK)) float32,
    one per BN×BK block, the last row/column of blocks ragged when N or K is not a multiple.
    The product is taken in float32 (one rounding) and rounded once to `dtype`.
    """
    bn, bk = block
    n, k = w.shape
    s = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), bn, axis=0), bk, axis=1)[:n, :k]
    return (e4m3_decode_ref(w) * s).astype(dtype)


def _make_fp8_dequant_kernel() -> KernelSource:
    metal = """
    // w: (N, K) uint8 e4m3 codes, row-major. s: (ceil(N/BN), ceil(K/BK)) float32 block scales.
    // dims = [N, K]. One thread per element i = r*K + c; out[i] = T(e4m3(w[i]) * s[r/BN, c/BK]).
    uint i = thread_position_in_grid.x;
    uint N = dims[0];
    uint K = dims[1];
    if (i >= N * K) {
        return;
    }
    uint r = i / K;
    uint c = i - r * K;
    uint nkb = (K + BK - 1) / BK;
    float v = latent_e4m3_to_float(w[i]) * s[(r / BN) * nkb + c / BK];
    out[i] = static_cast<T>(v);
    """
    cuda = """
    // Same layout as the Metal body: one thread per element of the (N, K) output.
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned N = dims[0];
    unsigned K = dims[1];
    if (i >= N * K) {
        return;
    }
    unsigned r = i / K;
    unsigned c = i - r * K;
    unsigned nkb = (K + BK - 1) / BK;
    float v = __fmul_rn(latent_e4m3_to_float(w[i]), s[(r / BN) * nkb + c / BK]);
    latent_store(&out[i], v);
    """
    return KernelSource(
        name="latent_fp8_dequant",
        input_names=("w", "s", "dims"),
        output_names=("out",),
        metal=metal,
        metal_header=E4M3_METAL,
        cuda=cuda,
        cuda_header=E4M3_CUDA,
    )


FP8_DEQUANT = _make_fp8_dequant_kernel()


def fp8_dequant_launch(
    w: mx.array, scale_inv: mx.array, block: tuple[int, int], dtype: mx.Dtype
) -> Launch:
    """Inputs, template, grid and outputs of one fp8_dequant call (also used by the shim)."""
    n, k = w.shape
    dims = mx.array([n, k], dtype=mx.uint32)
    return Launch(
        inputs=[w, scale_inv.astype(mx.float32), dims],
        template=[("T", dtype), ("BN", int(block[0])), ("BK", int(block[1]))],
        grid=(n * k, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(n, k)],
        output_dtypes=[dtype],
    )


def fp8_dequant_kernel(
    w: mx.array,
    scale_inv: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float16,
    *,
    backend: str = "metal",
) -> mx.array:
    """The Metal or CUDA kernel for `fp8_dequant_ref` (needs that backend)."""
    return run(FP8_DEQUANT, backend, fp8_dequant_launch(w, scale_inv, block, dtype))[0]


def dequant_fp8(
    w: mx.array,
    scale_inv: mx.array,
    block: tuple[int, int] = (128, 128),
    dtype: mx.Dtype = mx.float16,
    *,
    use_kernel: bool | None = None,
) -> mx.array:
    """Dispatcher: the kernel on Metal/CUDA, the reference on the CPU (or when use_kernel=False)."""
    which = pick(use_kernel)
    if which is None:
        return fp8_dequant_ref(w, scale_inv, block, dtype)
    return fp8_dequant_kernel(w, scale_inv, block, dtype, backend=which)

"""What every kernel file shares: the source record, the backend choice, lazy compilation.

A `KernelSource` holds a kernel's Metal body and its CUDA twin exactly as handed to
`mx.fast.metal_kernel` / `mx.fast.cuda_kernel`; `kernels/shim/` reads the same record to compile
the Metal body as C++. A `Launch` is one call's inputs, template values, grid and outputs, built
by the kernel's wrapper and reused by the shim so both run the body the same way.
This module knows nothing about any one format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class KernelSource:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    metal: str
    metal_header: str
    cuda: str
    cuda_header: str
    simd: bool = False  # the body exchanges values between the 32 lanes of a simdgroup/warp


@dataclass
class Launch:
    inputs: list[mx.array]
    template: list[tuple[str, object]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]


def _cuda_available() -> bool:
    try:
        return bool(mx.cuda.is_available())
    except Exception:
        return False


def backend() -> str:
    """ "metal", "cuda" or "cpu": where a kernel would run for the default device."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if _cuda_available():
        return "cuda"
    return "cpu"


def pick(use_kernel: bool | None) -> str | None:
    """The kernel backend to use, or None for the reference path.

    None: a kernel when a GPU backend is present; True: insist (error without one); False: never.
    """
    if use_kernel is False:
        return None
    b = backend()
    if b == "cpu":
        if use_kernel:
            raise RuntimeError("use_kernel=True but neither Metal nor CUDA is available")
        return None
    return b


@functools.cache
def compiled(src: KernelSource, which: str):
    """The mx.fast kernel object for one backend, built on first use (needs that backend)."""
    if which == "metal":
        return mx.fast.metal_kernel(
            name=src.name,
            input_names=list(src.input_names),
            output_names=list(src.output_names),
            source=src.metal,
            header=src.metal_header,
        )
    if which == "cuda":
        return mx.fast.cuda_kernel(
            name=src.name,
            input_names=list(src.input_names),
            output_names=list(src.output_names),
            source=src.cuda,
            header=src.cuda_header,
        )
    raise ValueError(f"no kernel backend {which!r}")


def run(src: KernelSource, which: str, launch: Launch) -> list[mx.array]:
    kernel = compiled(src, which)
    return kernel(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
    )


# fp8 e4m3 ("fn") decoding shared by the fp8 kernels: built from the bits, not MLX's `from_fp8`
# (whose Metal version reads the NaN code as 480).
E4M3_METAL = """
// fp8 e4m3fn: S.EEEE.MMM, bias 7, no infinities, S.1111.111 = NaN, subnormals 2^-6 * m/8.
inline float latent_e4m3_to_float(uint8_t code) {
    uint s = (uint(code) >> 7) & 1u;
    uint e = (uint(code) >> 3) & 15u;
    uint m = uint(code) & 7u;
    uint bits;
    if (e == 0u) {
        bits = as_type<uint>(float(m) * 0.001953125f);  // 2^-9 * m, exact
    } else if (e == 15u && m == 7u) {
        bits = 0x7fc00000u;  // quiet NaN
    } else {
        bits = ((e + 120u) << 23) | (m << 20);  // 2^(e-7) * (1 + m/8): rebias 7 -> 127
    }
    return as_type<float>(bits | (s << 31));
}
"""

E4M3_CUDA = """
__device__ __forceinline__ float latent_e4m3_to_float(uint8_t code) {
    unsigned s = (unsigned(code) >> 7) & 1u;
    unsigned e = (unsigned(code) >> 3) & 15u;
    unsigned m = unsigned(code) & 7u;
    unsigned bits;
    if (e == 0u) {
        bits = __float_as_uint(__fmul_rn(float(m), 0.001953125f));  // 2^-9 * m, exact
    } else if (e == 15u && m == 7u) {
        bits = 0x7fc00000u;  // quiet NaN
    } else {
        bits = ((e + 120u) << 23) | (m << 20);  // 2^(e-7) * (1 + m/8)
    }
    return __uint_as_float(bits | (s << 31));
}
__device__ __forceinline__ void latent_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void latent_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void latent_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ float latent_load(float v) { return v; }
__device__ __forceinline__ float latent_load(__half v) { return __half2float(v); }
__device__ __forceinline__ float latent_load(__nv_bfloat16 v) { return __bfloat162float(v); }
"""

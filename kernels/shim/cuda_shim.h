// Just enough of CUDA to compile our kernels' CUDA twins as C++ on the CPU, the way
// mx.fast.cuda_kernel wraps them (body inside a function whose template values are constexprs).
// Emulates: __device__/__forceinline__/__global__ qualifiers, threadIdx/blockIdx/blockDim,
// __half and __nv_bfloat16 storage with round-to-nearest-even conversions, the _rn arithmetic
// intrinsics (plain IEEE float ops under -ffp-contract=off), bit casts, and __shfl_xor_sync
// across the 32 lanes of a warp (lanes are real threads meeting at a barrier). C headers only.
#pragma once
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define __device__
#define __global__
#define __forceinline__ inline
#define __grid_constant__

struct shim_dim3 {
    unsigned x, y, z;
};
inline thread_local shim_dim3 threadIdx{0, 0, 0};
inline thread_local shim_dim3 blockIdx{0, 0, 0};
inline shim_dim3 blockDim{1, 1, 1};
inline shim_dim3 gridDim{1, 1, 1};

struct __half {
    _Float16 v;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (__builtin_isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = static_cast<uint32_t>(b.bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

namespace shim {
constexpr int kWarp = 32;
inline float g_slots[kWarp];
inline pthread_barrier_t g_barrier;
}  // namespace shim

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
    unsigned lane = threadIdx.x % shim::kWarp;
    shim::g_slots[lane] = v;
    pthread_barrier_wait(&shim::g_barrier);
    float other = shim::g_slots[lane ^ lane_mask];
    pthread_barrier_wait(&shim::g_barrier);
    return other;
}

inline void shim_run_lanes(void* (*lane_main)(void*)) {
    pthread_barrier_init(&shim::g_barrier, nullptr, shim::kWarp);
    pthread_t threads[shim::kWarp];
    for (uintptr_t lane = 0; lane < (uintptr_t)shim::kWarp; ++lane)
        pthread_create(&threads[lane], nullptr, lane_main, (void*)lane);
    for (int lane = 0; lane < shim::kWarp; ++lane) pthread_join(threads[lane], nullptr);
    pthread_barrier_destroy(&shim::g_barrier);
}

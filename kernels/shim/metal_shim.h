// Just enough of the Metal Shading Language to compile our kernel bodies as C++ on the CPU.
// Emulates: address-space qualifiers (empty macros), uint/ushort/uint3, half (= _Float16),
// as_type (a bit copy), the metal:: math the bodies may use, and simd_shuffle_xor across the 32
// lanes of a simdgroup (lanes are real threads meeting at a barrier). Compile with
// -ffp-contract=off so `a * b + c` rounds twice, as the references do. C headers only, so a
// build stays fast; the harness #undefs the qualifier macros after the body.
#pragma once
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef _Float16 half;
typedef _Float16 float16_t;

struct uint3 {
    uint x, y, z;
};

template <typename To, typename From>
inline To as_type(From from) {
    static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
    To to;
    memcpy(&to, &from, sizeof(To));
    return to;
}

namespace metal {
inline float fma(float a, float b, float c) { return fmaf(a, b, c); }
inline float abs(float a) { return fabsf(a); }
inline float exp(float a) { return expf(a); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
}  // namespace metal

// One simdgroup at a time: lane L runs on host thread L; a shuffle publishes each lane's
// value, waits for all 32, reads the partner's, and waits again before the slots are reused.
namespace shim {
constexpr int kSimdWidth = 32;
inline float g_slots[kSimdWidth];
inline pthread_barrier_t g_barrier;
inline thread_local uint t_lane = 0;
}  // namespace shim

inline float simd_shuffle_xor(float v, ushort mask) {
    shim::g_slots[shim::t_lane] = v;
    pthread_barrier_wait(&shim::g_barrier);
    float other = shim::g_slots[shim::t_lane ^ mask];
    pthread_barrier_wait(&shim::g_barrier);
    return other;
}

inline void shim_run_lanes(void* (*lane_main)(void*)) {
    pthread_barrier_init(&shim::g_barrier, nullptr, shim::kSimdWidth);
    pthread_t threads[shim::kSimdWidth];
    for (uintptr_t lane = 0; lane < (uintptr_t)shim::kSimdWidth; ++lane)
        pthread_create(&threads[lane], nullptr, lane_main, (void*)lane);
    for (int lane = 0; lane < shim::kSimdWidth; ++lane) pthread_join(threads[lane], nullptr);
    pthread_barrier_destroy(&shim::g_barrier);
}

#define device
#define constant
#define threadgroup
#define thread

// Just enough of the Metal Shading Language to compile our kernel bodies as C++ on the CPU.
// Emulates: address-space qualifiers (empty), uint/ushort/uint3, half (= _Float16), as_type
// (a bit copy), metal:: math used by the bodies, and simd_shuffle_xor across the 32 lanes of
// a simdgroup (lanes are real threads meeting at a barrier). Compile with -ffp-contract=off so
// `a * b + c` rounds twice, as the references do.
// The address-space macros are defined last (after every std header) and the harness
// #undefs them after the body, since `thread` would break <thread>.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

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
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

namespace metal {
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float abs(float a) { return std::fabs(a); }
inline float exp(float a) { return std::exp(a); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
}  // namespace metal

// One simdgroup at a time: lane L of the group runs on host thread L; a shuffle publishes each
// lane's value, waits for all 32, reads the partner's, and waits again before slots are reused.
namespace shim {
constexpr int kSimdWidth = 32;
inline float g_slots[kSimdWidth];
inline std::barrier<>* g_barrier = nullptr;
inline thread_local uint t_lane = 0;
}  // namespace shim

inline float simd_shuffle_xor(float v, ushort mask) {
    shim::g_slots[shim::t_lane] = v;
    shim::g_barrier->arrive_and_wait();
    float other = shim::g_slots[shim::t_lane ^ mask];
    shim::g_barrier->arrive_and_wait();
    return other;
}

#define device
#define constant
#define threadgroup
#define thread

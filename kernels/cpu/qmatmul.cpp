// CPU kernels for MLX's affine-quantized weights, as MLX primitives (an MLX C++ extension).
//
// MLX's CPU `quantized_matmul` runs one-token decoding at 0.3-0.9 GB/s of weights on this
// project's build machine (single thread, no SIMD), and its `dequantize` at ~0.1-0.2 G
// elements/s. These two primitives replace them on the CPU:
//
//   qmm_rows(x (..., K) f32, w (N, K*bits/32) u32, scales (N, K/g), biases (N, K/g), g, bits)
//       -> (..., N) f32 = x @ dequantize(w).T, for a few rows (decode, draft verification,
//          batched decode): each weight group is unpacked once and used for every row.
//   dequantize_f32(w, scales, biases, g, bits) -> (N, K) f32, for prompt chunks (then GEMM).
//
// Layout (MLX affine): element k of row n is bits [bits*(k%per), ...) of word k/per, where
// per = 32/bits, low bits first; value = q * scales[n, k/g] + biases[n, k/g]. Supported: bits
// 4 and 8, g a multiple of 32, scales/biases float32, float16 or bfloat16, x float32.
//
// Work is split over weight rows between the MLX CPU stream thread and a small pool of
// workers that spin briefly between calls (decode issues ~200 of these per token), then sleep.
// AVX2/FMA code is chosen at run time; other CPUs take the portable loops.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LATENT_X86 1
#endif

#include <cmath>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// ---------------------------------------------------------------------------------------
// Thread pool: run(n, fn) calls fn(c) once for every chunk c in [0, n). The calling thread and
// the workers claim chunks from one atomic counter, so a worker the OS has not scheduled yet
// never holds the caller up: the caller then simply runs more chunks itself (this machine's 2
// cores are often shared). Workers spin briefly between calls (decode issues ~200 per token),
// then sleep.

std::atomic<bool> forked_child{false};
// Worker wait policy (measured on the 2-core build machine: pure spinning for 300 us made a
// decode step ~1.6x slower than spinning 20 us and then yielding).
constexpr int g_spin_us = 20, g_sleep_us = 1000;

class Pool {
 public:
  static constexpr int kMaxChunks = 0xFFFF;  // chunk indices and counts are 16-bit fields
  explicit Pool(int n_threads) { resize(n_threads); }
  ~Pool() { stop(); }

  int size() const { return n_workers_ + 1; }

  void resize(int n_threads) {
    stop();
    n_workers_ = std::max(0, n_threads - 1);
    quit_ = false;
    // Each worker starts from the wake count current now: a run() issued before the thread
    // gets scheduled must still count as new work for it.
    const uint64_t start = wake_.load(std::memory_order_acquire);
    for (int i = 0; i < n_workers_; ++i) {
      workers_.emplace_back([this, start] { loop(start); });
    }
  }

  void run(int n_chunks, const std::function<void(int)>& fn) {
    // In a forked child the workers are gone and the mutexes may be held: run inline.
    if (forked_child.load(std::memory_order_relaxed)) {
      for (int c = 0; c < n_chunks; ++c) fn(c);
      return;
    }
    // A second caller (another stream or thread) runs its work inline instead of waiting.
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || n_workers_ == 0 || n_chunks <= 1 || n_chunks > kMaxChunks) {
      for (int c = 0; c < n_chunks; ++c) fn(c);
      return;
    }
    job_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    // state = (run id << 32) | (chunk count << 16) | next chunk, published at once: a worker
    // holding the previous, exhausted run's state can claim nothing. (With the count in a
    // separate variable, a worker could read the old state next to the new count, claim a
    // chunk that did not exist, and run it with the new job before the run began — and its
    // completion then counted towards the new run, which could return while a chunk still ran:
    // a rare corrupted decode step.)
    const uint64_t id = ++run_id_;
    state_.store((id << 32) | (uint64_t(n_chunks) << 16), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      wake_.fetch_add(1, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    work(id);
    while (done_.load(std::memory_order_acquire) < n_chunks) {
      pause();
    }
  }

 private:
  static void pause() {
#ifdef LATENT_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Claim and run chunks of run `id` until none is left.
  void work(uint64_t id) {
    uint64_t v = state_.load(std::memory_order_acquire);
    while ((v >> 32) == id && (v & 0xFFFFu) < ((v >> 16) & 0xFFFFu)) {
      if (state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
        // The run cannot finish before this chunk is done, so job_ is still this run's.
        (*job_)(static_cast<int>(v & 0xFFFFu));
        done_.fetch_add(1, std::memory_order_acq_rel);
        v = state_.load(std::memory_order_acquire);
      }
    }
  }

  void loop(uint64_t seen) {
    while (true) {
      // Spin briefly (the next call usually comes within microseconds), then yield the core
      // to other runnable threads for a while (on 2 cores the Python thread building the next
      // graph and MLX's stream thread need it), then sleep.
      auto start = std::chrono::steady_clock::now();
      uint64_t w = seen;
      int spins = 0;
      while ((w = wake_.load(std::memory_order_acquire)) == seen && !quit_) {
        if (++spins % 64 != 0) {
          pause();
          continue;
        }
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited > std::chrono::microseconds(g_sleep_us)) {
          std::unique_lock<std::mutex> lk(sleep_mutex_);
          sleep_cv_.wait(lk, [&] {
            return wake_.load(std::memory_order_acquire) != seen || quit_;
          });
        } else if (waited > std::chrono::microseconds(g_spin_us)) {
          std::this_thread::yield();
        }
      }
      if (quit_) return;
      seen = w;
      work(state_.load(std::memory_order_acquire) >> 32);
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      quit_ = true;
    }
    sleep_cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  int n_workers_ = 0;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> wake_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> quit_{false};
  uint64_t run_id_ = 0;
  const std::function<void(int)>* job_ = nullptr;
};

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(n ? n : 1u, 1u, 8u));
}

Pool& pool() {
  static Pool p(default_threads());
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); });
    return true;
  }();
  (void)registered;
  return p;
}

// Rows [begin, end) of `n` for chunk c of `chunks`.
inline void split(int n, int chunks, int c, int& begin, int& end) {
  begin = static_cast<int>(int64_t(n) * c / chunks);
  end = static_cast<int>(int64_t(n) * (c + 1) / chunks);
}

// Chunks for an (N, K) weight: ~32 K elements or more each, at most 8 per thread.
inline int chunks_for(int N, int K, int threads) {
  const int64_t by_size = int64_t(N) * K / (32 * 1024);
  return static_cast<int>(std::clamp<int64_t>(by_size, 1, std::min(N, 8 * threads)));
}

bool has_avx2() {
#ifdef LATENT_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace

#include "attention.h"

namespace {

// ---------------------------------------------------------------------------------------
// Scale/bias loading for each float dtype.

inline float to_f32(float v) { return v; }
inline float to_f32(mx::float16_t v) { return static_cast<float>(v); }
inline float to_f32(mx::bfloat16_t v) { return static_cast<float>(v); }

// Per call, the activations are rearranged once so the kernel reads them in the order the
// weights unpack: for 4 bits, each 32-element block becomes [x0 x2 .. x30 x1 x3 .. x31]
// (low nibbles of 16 bytes, then high nibbles). Also each row's per-group sums, for the bias.
//
// The AVX2 kernel instead multiplies in 16-bit integers (vpmaddwd: 16 products a uop, against 8
// float FMAs after 2-3 shuffles per 8 weights; the float kernel was compute-bound at ~9 GB/s of
// weights a core, a third of this machine's bandwidth). Activations are quantized per
// 32-element block to int16 with scale max|x|/32767 (relative error <= 1.5e-5 per element; the
// weight side stays exact), in the order the weights unpack as 16-bit lanes:
//   4 bits, per 64 elements (2 blocks): 4 vectors of 16, vector i holding elements 4l + i;
//   8 bits, per 32 elements: 2 vectors of 16, vector i holding elements 2l + i.
// The bias term uses the exact float sums.
struct Activations {
  std::vector<float> xp;    // (M, K) rearranged (portable kernel)
  std::vector<float> xsum;  // (M, K/g)
  std::vector<int16_t> xq;  // (M, K') quantized and rearranged (AVX2 kernel), K' = K rounded up to 64
  std::vector<float> xd;    // (M, K'/32) per-block scales
};

// The int16 form of one activation row.
inline void quantize_row_i16(const float* xr, int K, int bits, int16_t* q, float* d) {
  const int Kp = (K + 63) / 64 * 64;
  std::fill(q, q + Kp, int16_t(0));
  for (int b = 0; b < Kp / 32; ++b) {
    float m = 0.f;
    if (b * 32 < K) {
      for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xr[b * 32 + i]));
    }
    d[b] = m / 32767.f;
  }
  for (int k = 0; k < K; ++k) {
    const int b = k / 32;
    const float inv = d[b] > 0.f ? 1.f / d[b] : 0.f;
    int at;
    if (bits == 4) {
      const int base = k / 64 * 64, e = k % 64;  // element e = 4l + i -> vector i, lane l
      at = base + (e % 4) * 16 + e / 4;
    } else {
      const int base = k / 32 * 32, e = k % 32;  // element e = 2l + i -> vector i, lane l
      at = base + (e % 2) * 16 + e / 2;
    }
    q[at] = static_cast<int16_t>(std::lrint(xr[k] * inv));
  }
}

Activations prepare(const float* x, int M, int K, int g, int bits) {
  Activations a;
  if (has_avx2()) {
    const int Kp = (K + 63) / 64 * 64;
    a.xq.resize(size_t(M) * Kp);
    // per block; for 4 bits expanded to one 8-lane vector per 64-element pair (A x4, B x4)
    const int per_row = bits == 4 ? Kp / 64 * 8 : Kp / 32;
    a.xd.resize(size_t(M) * per_row);
    std::vector<float> d(Kp / 32);
    for (int m = 0; m < M; ++m) {
      quantize_row_i16(x + size_t(m) * K, K, bits, a.xq.data() + size_t(m) * Kp, d.data());
      float* out = a.xd.data() + size_t(m) * per_row;
      if (bits == 4) {
        for (int b = 0; b < Kp / 32; ++b) std::fill_n(out + b * 4, 4, d[b]);
      } else {
        std::copy(d.begin(), d.end(), out);
      }
    }
  }
  const bool float_form = !has_avx2();
  if (float_form) a.xp.resize(size_t(M) * K);
  a.xsum.resize(size_t(M) * (K / g));
  for (int m = 0; m < M; ++m) {
    const float* xr = x + size_t(m) * K;
    if (float_form) {
      float* out = a.xp.data() + size_t(m) * K;
      if (bits == 4) {
        for (int b = 0; b < K; b += 32) {
          for (int i = 0; i < 16; ++i) {
            out[b + i] = xr[b + 2 * i];
            out[b + 16 + i] = xr[b + 2 * i + 1];
          }
        }
      } else {
        std::memcpy(out, xr, sizeof(float) * K);
      }
    }
    for (int gi = 0; gi < K / g; ++gi) {
      float s = 0.f;
      for (int k = 0; k < g; ++k) s += xr[gi * g + k];
      a.xsum[size_t(m) * (K / g) + gi] = s;
    }
  }
  return a;
}

// Portable kernel: y[m, n] for n in [n0, n1).
template <typename S>
void qmm_rows_portable(
    const Activations& a, const uint8_t* w, const S* scales, const S* biases, float* y, int M,
    int N, int K, int g, int bits, int n0, int n1) {
  const int groups = K / g;
  const size_t row_bytes = size_t(K) * bits / 8;
  std::vector<float> q(K);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    // unpacked in the same order as the rearranged activations
    if (bits == 4) {
      for (int b = 0; b < K; b += 32) {
        const uint8_t* blk = wr + b / 2;
        for (int i = 0; i < 16; ++i) {
          q[b + i] = float(blk[i] & 0xF);
          q[b + 16 + i] = float(blk[i] >> 4);
        }
      }
    } else {
      for (int k = 0; k < K; ++k) q[k] = float(wr[k]);
    }
    for (int m = 0; m < M; ++m) {
      const float* xp = a.xp.data() + size_t(m) * K;
      const float* xs = a.xsum.data() + size_t(m) * groups;
      float total = 0.f;
      for (int gi = 0; gi < groups; ++gi) {
        float dot = 0.f;
        for (int k = gi * g; k < (gi + 1) * g; ++k) dot += q[k] * xp[k];
        total += to_f32(scales[size_t(n) * groups + gi]) * dot +
            to_f32(biases[size_t(n) * groups + gi]) * xs[gi];
      }
      y[size_t(m) * N + n] = total;
    }
  }
}

#ifdef LATENT_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// n scales or biases of one weight row as float32 (F16C for float16; bfloat16 is the top half).
template <typename S>
__attribute__((target("avx2,fma,f16c"))) inline void row_to_f32(const S* src, int n, float* dst) {
  if constexpr (std::is_same_v<S, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if constexpr (std::is_same_v<S, mx::float16_t>) {
    const auto* h = reinterpret_cast<const uint16_t*>(src);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    }
    for (; i < n; ++i) dst[i] = _cvtsh_ss(h[i]);
  } else {
    const auto* h = reinterpret_cast<const uint16_t*>(src);
    for (int i = 0; i < n; ++i) {
      const uint32_t bits = uint32_t(h[i]) << 16;
      std::memcpy(dst + i, &bits, sizeof(float));
    }
  }
}

__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b, int K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  if (k + 8 <= K) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    k += 8;
  }
  if (k < K) {  // the last 1-7 elements through a masked load
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(K - k),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + k, mask), _mm256_maskload_ps(b + k, mask), s1);
  }
  return hsum(_mm256_add_ps(s0, s1));
}

// One 64-weight pair of a 4-bit row (32 bytes; a last lone block of 32 is zero-extended, its x
// being 0 there) into acc[j] for MB activation rows: the nibbles as 16-bit lanes, vpmaddwd
// against the int16 activations, exact int32 sums per block, then x scale and weight scale.
template <int MB>
__attribute__((target("avx2,fma"), always_inline)) inline void q4_pair(
    const uint8_t* wr, int k, int K, const float* sf, int g, const int16_t* const* xq,
    const float* const* xd, __m256 (&acc)[MB]) {
  const __m256i nib = _mm256_set1_epi16(0x000F);
  const __m256i v = k + 64 <= K
      ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k / 2))
      : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
  const __m256i q0 = _mm256_and_si256(v, nib);
  const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), nib);
  const __m256i q3 = _mm256_srli_epi16(v, 12);
  // g = 32: blocks A and B have their own scales (sf has a spare entry past a lone last block)
  const __m256 sw = g == 32
      ? _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(
                _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sf + k / 32)))),
            _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))
      : g % 64 == 0 ? _mm256_set1_ps(sf[k / g])
                    : _mm256_set_m128(_mm_set1_ps(sf[(k + 32) / g]), _mm_set1_ps(sf[k / g]));
  for (int j = 0; j < MB; ++j) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xq[j] + k);
    const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256(x)),
                                        _mm256_madd_epi16(q1, _mm256_loadu_si256(x + 1)));
    const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(q2, _mm256_loadu_si256(x + 2)),
                                        _mm256_madd_epi16(q3, _mm256_loadu_si256(x + 3)));
    const __m256 d = _mm256_loadu_ps(xd[j] + k / 64 * 8);
    acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), d), sw,
                             acc[j]);
  }
}

// Up to MB activation rows at once, so each unpacked weight vector is reused MB times.
// Weights are read as 16-bit lanes: for 4 bits a lane holds elements 4l..4l+3 (nibble i =
// element 4l + i), for 8 bits elements 2l, 2l+1; products are summed exactly in int32 per block
// and scaled once per block (weight scale x activation scale). For 4 bits the int32 lanes 0-3
// hold block A of a 64-weight pair and lanes 4-7 block B, so one per-lane scale vector serves
// both.
template <typename S, int MB>
__attribute__((target("avx2,fma,f16c"))) void qmm_rows_avx2_block(
    const Activations& a, const uint8_t* w, const S* scales, const S* biases, float* y, int m0,
    int N, int K, int g, int bits, int n0, int n1) {
  const int groups = K / g;
  const int Kp = (K + 63) / 64 * 64;
  const size_t row_bytes = size_t(K) * bits / 8;
  const int16_t* xq[MB];
  const float* xd[MB];
  const float* xs[MB];
  const int xd_row = bits == 4 ? Kp / 64 * 8 : Kp / 32;
  for (int j = 0; j < MB; ++j) {
    xq[j] = a.xq.data() + size_t(m0 + j) * Kp;
    xd[j] = a.xd.data() + size_t(m0 + j) * xd_row;
    xs[j] = a.xsum.data() + size_t(m0 + j) * groups;
  }
  // this row's scales/biases as float32 (half-precision ones converted; one spare entry at the
  // end of the scales for the lone last block of a 64-weight pair)
  std::vector<float> sbuf(groups + 1, 0.f), bbuf(groups);
  const __m256i byte = _mm256_set1_epi16(0x00FF);
  constexpr int ahead = 4;  // rows prefetched ahead: DRAM latency, not bandwidth, stalled the loads
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    if (n + ahead < n1) {
      const char* next = reinterpret_cast<const char*>(wr + ahead * row_bytes);
      for (size_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(scales + size_t(n + ahead) * groups), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(biases + size_t(n + ahead) * groups), _MM_HINT_T0);
    }
    const float* sf;
    const float* bf;
    if constexpr (std::is_same_v<S, float>) {
      sf = scales + size_t(n) * groups;
      bf = biases + size_t(n) * groups;
      if (K % 64 != 0 && g % 64 != 0) {  // the pair scales below would read one past the row
        std::copy_n(sf, groups, sbuf.data());
        sf = sbuf.data();
      }
    } else {
      row_to_f32(scales + size_t(n) * groups, groups, sbuf.data());
      row_to_f32(biases + size_t(n) * groups, groups, bbuf.data());
      sf = sbuf.data();
      bf = bbuf.data();
    }
    __m256 total[MB];
    for (int j = 0; j < MB; ++j) total[j] = _mm256_setzero_ps();
    if (bits == 4) {
      // two accumulator sets on alternate pairs: one FMA chain per row was latency-bound
      __m256 odd[MB];
      for (int j = 0; j < MB; ++j) odd[j] = _mm256_setzero_ps();
      int k = 0;
      for (; k + 128 <= K; k += 128) {
        q4_pair<MB>(wr, k, K, sf, g, xq, xd, total);
        q4_pair<MB>(wr, k + 64, K, sf, g, xq, xd, odd);
      }
      for (; k < K; k += 64) q4_pair<MB>(wr, k, K, sf, g, xq, xd, total);
      for (int j = 0; j < MB; ++j) total[j] = _mm256_add_ps(total[j], odd[j]);
    } else {
      for (int k = 0; k < K; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256i q0 = _mm256_and_si256(v, byte);
        const __m256i q1 = _mm256_srli_epi16(v, 8);
        const float sw = sf[k / g];
        for (int j = 0; j < MB; ++j) {
          const __m256i* x = reinterpret_cast<const __m256i*>(xq[j] + k);
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256(x)),
                                             _mm256_madd_epi16(q1, _mm256_loadu_si256(x + 1)));
          total[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sw * xd[j][k / 32]),
                                     total[j]);
        }
      }
    }
    for (int j = 0; j < MB; ++j) {
      y[size_t(m0 + j) * N + n] = hsum(total[j]) + dot_avx2(bf, xs[j], groups);
    }
  }
}

template <typename S>
void qmm_rows_avx2(
    const Activations& a, const uint8_t* w, const S* scales, const S* biases, float* y, int M,
    int N, int K, int g, int bits, int n0, int n1) {
  int m = 0;
  for (; m + 4 <= M; m += 4)
    qmm_rows_avx2_block<S, 4>(a, w, scales, biases, y, m, N, K, g, bits, n0, n1);
  switch (M - m) {
    case 3:
      qmm_rows_avx2_block<S, 3>(a, w, scales, biases, y, m, N, K, g, bits, n0, n1);
      break;
    case 2:
      qmm_rows_avx2_block<S, 2>(a, w, scales, biases, y, m, N, K, g, bits, n0, n1);
      break;
    case 1:
      qmm_rows_avx2_block<S, 1>(a, w, scales, biases, y, m, N, K, g, bits, n0, n1);
      break;
    default:
      break;
  }
}
#endif

template <typename S>
void qmm_rows_impl(
    const float* x, const uint8_t* w, const S* scales, const S* biases, float* y, int M, int N,
    int K, int g, int bits) {
  const Activations a = prepare(x, M, K, g, bits);
  Pool& p = pool();
  const int chunks = chunks_for(N, K, p.size());
  p.run(chunks, [&](int c) {
    int n0, n1;
    split(N, chunks, c, n0, n1);
#ifdef LATENT_X86
    if (has_avx2()) {
      qmm_rows_avx2<S>(a, w, scales, biases, y, M, N, K, g, bits, n0, n1);
      return;
    }
#endif
    qmm_rows_portable<S>(a, w, scales, biases, y, M, N, K, g, bits, n0, n1);
  });
}

template <typename S>
void dequantize_impl(
    const uint8_t* w, const S* scales, const S* biases, float* out, int N, int K, int g,
    int bits) {
  const int groups = K / g;
  const size_t row_bytes = size_t(K) * bits / 8;
  Pool& p = pool();
  const int chunks = chunks_for(N, K, p.size());
  p.run(chunks, [&](int c) {
    int n0, n1;
    split(N, chunks, c, n0, n1);
    for (int n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * row_bytes;
      float* o = out + size_t(n) * K;
      for (int gi = 0; gi < groups; ++gi) {
        const float s = to_f32(scales[size_t(n) * groups + gi]);
        const float b = to_f32(biases[size_t(n) * groups + gi]);
        if (bits == 4) {
          const uint8_t* src = wr + gi * g / 2;
          float* dst = o + gi * g;
          for (int i = 0; i < g / 2; ++i) {
            dst[2 * i] = float(src[i] & 0xF) * s + b;
            dst[2 * i + 1] = float(src[i] >> 4) * s + b;
          }
        } else {
          const uint8_t* src = wr + gi * g;
          float* dst = o + gi * g;
          for (int i = 0; i < g; ++i) dst[i] = float(src[i]) * s + b;
        }
      }
    }
  });
}

// Calls fn with the scale element type of `dtype`.
template <typename F>
void with_scale_type(mx::Dtype dtype, F&& fn) {
  if (dtype == mx::float32) {
    fn(float{});
  } else if (dtype == mx::float16) {
    fn(mx::float16_t{});
  } else if (dtype == mx::bfloat16) {
    fn(mx::bfloat16_t{});
  } else {
    throw std::invalid_argument("[latent qmm] scales must be float32, float16 or bfloat16");
  }
}

// Weights and scales are evaluated parameters, row-contiguous already: adding a copy node per
// call (~200 per token) would cost more than the copy, so only unknown layouts get one.
mx::array packed(const mx::array& a, mx::Stream stream) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, stream);
}

// Activations arrive unevaluated (layout unknown until run): a strided x is gathered in the
// kernel instead (it is small).
// (Also reads float16 arrays, converted: a float16 KV cache seen by prompt-chunk attention.)
template <typename T>
std::vector<float> gather_as_float(const mx::array& x) {
  std::vector<float> out(x.size());
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const T* src = x.data<T>();
  std::vector<int> idx(shape.size(), 0);
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t loc = 0;
    for (size_t d = 0; d < shape.size(); ++d) loc += int64_t(idx[d]) * strides[d];
    out[i] = static_cast<float>(src[loc]);
    for (int d = int(shape.size()) - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

std::vector<float> gather_rows(const mx::array& x) {
  return x.dtype() == mx::float16 ? gather_as_float<mx::float16_t>(x) : gather_as_float<float>(x);
}

// A row-contiguous float pointer to x (gathered into `keep` when x is strided).
inline const float* rows_of(const mx::array& x, std::vector<float>& keep) {
  if (x.flags().row_contiguous && x.dtype() == mx::float32) return x.data<float>();
  keep = gather_rows(x);
  return keep.data();
}

// What every primitive of ours shares: it runs on the CPU only, under a name.
class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  CpuPrimitive(mx::Stream stream, const char* name) : mx::UnaryPrimitive(stream), name_(name) {}
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string("[") + name_ + "] CPU-only primitive");
  }
  const char* name() const override { return name_; }

 private:
  const char* name_;
};

// The CPU encoder for a primitive's eval, its one output allocated and its arrays registered.
mx::cpu::CommandEncoder& begin_eval(
    mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}

// Gradients for `argnums` through `fn`, the same math in MLX's own ops (training is rare here).
std::vector<mx::array> vjp_through(
    const std::function<std::vector<mx::array>(const std::vector<mx::array>&)>& fn,
    const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  auto grads = mx::vjp(fn, primals, cotangents).second;
  std::vector<mx::array> picked;
  for (int a : argnums) picked.push_back(grads[a]);
  return picked;
}

// ---------------------------------------------------------------------------------------
// MLX primitives.

mx::array dequantize_f32(
    const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
    int bits, mx::StreamOrDevice s = {});

class QuantizedRowsMatmul : public CpuPrimitive {
 public:
  QuantizedRowsMatmul(mx::Stream stream, int group_size, int bits)
      : CpuPrimitive(stream, "LatentQuantizedRowsMatmul"), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    const auto& scales = inputs[2];
    const auto& biases = inputs[3];
    auto& enc = begin_eval(stream(), inputs, out);
    const int K = x.shape(-1);
    const int M = static_cast<int>(x.size() / K);
    const int N = w.shape(0);
    enc.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                  scales = mx::array::unsafe_weak_copy(scales),
                  biases = mx::array::unsafe_weak_copy(biases),
                  out = mx::array::unsafe_weak_copy(out), M, N, K, g = group_size_,
                  bits = bits_]() mutable {
      std::vector<float> gathered;
      const float* xd = rows_of(x, gathered);
      with_scale_type(scales.dtype(), [&](auto tag) {
        using S = decltype(tag);
        qmm_rows_impl<S>(
            xd, reinterpret_cast<const uint8_t*>(w.data<uint32_t>()),
            scales.data<S>(), biases.data<S>(), out.data<float>(), M, N, K, g, bits);
      });
    });
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    // Only the activations can carry a gradient: d x = d y @ W.
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg != 0) {
        throw std::invalid_argument("[latent qmm] no gradient for quantized weights");
      }
      auto wf = dequantize_f32(
          primals[1], primals[2], primals[3], group_size_, bits_, stream());
      grads.push_back(mx::matmul(cotangents[0], wf, stream()));
    }
    return grads;
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedRowsMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int group_size_, bits_;
};

class DequantizeF32 : public CpuPrimitive {
 public:
  DequantizeF32(mx::Stream stream, int group_size, int bits)
      : CpuPrimitive(stream, "LatentDequantizeF32"), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& w = inputs[0];
    const auto& scales = inputs[1];
    const auto& biases = inputs[2];
    auto& enc = begin_eval(stream(), inputs, out);
    const int N = out.shape(0);
    const int K = out.shape(1);
    enc.dispatch([w = mx::array::unsafe_weak_copy(w),
                  scales = mx::array::unsafe_weak_copy(scales),
                  biases = mx::array::unsafe_weak_copy(biases),
                  out = mx::array::unsafe_weak_copy(out), N, K, g = group_size_,
                  bits = bits_]() mutable {
      with_scale_type(scales.dtype(), [&](auto tag) {
        using S = decltype(tag);
        dequantize_impl<S>(
            reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), scales.data<S>(),
            biases.data<S>(), out.data<float>(), N, K, g, bits);
      });
    });
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DequantizeF32&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
  }

 private:
  int group_size_, bits_;
};

class CpuAttention : public CpuPrimitive {
 public:
  CpuAttention(mx::Stream stream, float scale, bool causal)
      : CpuPrimitive(stream, "LatentCpuAttention"), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    enc.dispatch([q = mx::array::unsafe_weak_copy(inputs[0]),
                  k = mx::array::unsafe_weak_copy(inputs[1]),
                  v = mx::array::unsafe_weak_copy(inputs[2]),
                  out = mx::array::unsafe_weak_copy(out), scale = scale_,
                  causal = causal_]() mutable { run(q, k, v, out, scale, causal); });
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    // Training is rare on this path: differentiate MLX's own attention on the same inputs.
    auto s = stream();
    float scale = scale_;
    std::string mode = causal_ ? "causal" : "";
    auto fn = [=](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{mx::fast::scaled_dot_product_attention(
          in[0], in[1], in[2], scale, mode, std::nullopt, std::nullopt, false, s)};
    };
    return vjp_through(fn, primals, cotangents, argnums);
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CpuAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[2].shape(-1);
    return {shape};
  }

 private:
  static latent_attention::View view_of(const mx::array& a, std::vector<float>& keep) {
    auto st = a.strides();
    if (st[3] != 1 || a.dtype() != mx::float32) {
      // last dimension not contiguous, or float16 K/V of a prompt chunk: as float32 once
      keep = gather_rows(a);
      const int64_t S = a.shape(2), D = a.shape(3), H = a.shape(1);
      return {keep.data(), H * S * D, S * D, D};
    }
    return {a.data<float>(), st[0], st[1], st[2]};
  }

  static void run(
      const mx::array& q, const mx::array& k, const mx::array& v, mx::array& out, float scale,
      bool causal) {
    using namespace latent_attention;
    const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
    const int Hkv = k.shape(1), S = k.shape(2), Dv = v.shape(3);
    const int group = Hq / Hkv;
    std::vector<float> qkeep, kkeep, vkeep;
    const View qv = view_of(q, qkeep);
    float* o = out.data<float>();  // (B, Hq, L, Dv) row-contiguous
    if (L == 1 && B == 1) {
      // one token (decode, or a batch row): the same routine as the fused decode layer, so
      // both paths give the same bits; float16 K/V read as they are
      std::vector<float> qrows(size_t(Hq) * D);
      for (int h = 0; h < Hq; ++h) std::copy_n(qv.row(0, h, 0), D, &qrows[size_t(h) * D]);
      // (causal or not, the one query sits at the last position and sees every key)
      const Heads heads{Hq, Hkv, D, Dv};
      if (k.dtype() == mx::float16 && k.strides()[3] == 1 && v.strides()[3] == 1) {
        auto half_view = [](const mx::array& a) {
          const auto st = a.strides();
          return ViewT<Half>{reinterpret_cast<const Half*>(a.data<mx::float16_t>()), st[0], st[1],
                             st[2]};
        };
        decode_attention(qrows.data(), half_view(k), half_view(v), S, heads, scale, o);
      } else {
        decode_attention(qrows.data(), view_of(k, kkeep), view_of(v, vkeep), S, heads, scale, o);
      }
      return;
    }
    const View kv = view_of(k, kkeep), vv = view_of(v, vkeep);
    // A block is QB rows (query head, position) that share one K/V head, position-major:
    // the query heads of a GQA group go together, so one-token decoding fills a block with the
    // group's heads instead of one real row and seven padding rows.
    const int rows_per_kv = L * group;
    const int blocks = (rows_per_kv + QB - 1) / QB;
    const int items = B * Hkv * blocks;
    Pool& p = pool();
    const int chunks = std::min(items, 16 * p.size());
    const bool simd = has_avx2() && Dv % 8 == 0 && Dv <= 256;
    p.run(chunks, [&](int c) {
      int i0, i1;
      split(items, chunks, c, i0, i1);
      std::vector<float> sbuf, qt(size_t(D) * QB);
      for (int it = i0; it < i1; ++it) {
        const int blk = it % blocks, hk = (it / blocks) % Hkv, b = it / (blocks * Hkv);
        const int r0 = blk * QB, rows = std::min(QB, rows_per_kv - r0);
        int limit[QB], head[QB], pos[QB];
        for (int r = 0; r < QB; ++r) {
          const int idx = r0 + std::min(r, rows - 1);  // padding rows repeat the last one
          pos[r] = idx / group;
          head[r] = hk * group + idx % group;
          limit[r] = causal ? S - L + pos[r] : S - 1;
        }
        const int n = limit[QB - 1] + 1;  // keys the block's last row sees (the most)
        auto out_row = [&](int r) { return o + ((int64_t(b) * Hq + head[r]) * L + pos[r]) * Dv; };
#ifdef LATENT_X86
        if (simd) {
          for (int r = 0; r < QB; ++r) {
            const float* qr = qv.row(b, head[r], pos[r]);
            for (int d = 0; d < D; ++d) qt[d * QB + r] = r < rows ? qr[d] : 0.f;
          }
          sbuf.resize(size_t(n) * QB);
          scores_block(qt.data(), kv, b, hk, n, D, sbuf.data());
          softmax_cols(sbuf.data(), n, limit, scale);
          for (int r = 0; r < rows; ++r) pv_row(sbuf.data(), r, vv, b, hk, n, Dv, out_row(r));
          continue;
        }
#endif
        for (int r = 0; r < rows; ++r) {
          attend_row_portable(qv.row(b, head[r], pos[r]), kv, vv, b, hk, limit[r] + 1, D, Dv,
                              scale, out_row(r), sbuf);
        }
      }
    });
  }

  float scale_;
  bool causal_;
};

// ---------------------------------------------------------------------------------------
// Row-level math shared by the single-op primitives and the fused decode layer (decode.h).

// o = x * rsqrt(mean(x^2) + eps) * w over D elements.
inline void rms_norm_row(const float* x, const float* w, float* o, int64_t D, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) o[i] = x[i] * inv * w[i];
}

// cos/sin of the `half` rotary angles at (already scaled) position p.
inline void rope_angles(float p, const float* periods, int half, float* cs, float* sn) {
  for (int i = 0; i < half; ++i) {
    const float theta = p * (1.0f / periods[i]);
    cs[i] = std::cos(theta);
    sn[i] = std::sin(theta);
  }
}

// One head's row: pairs (i, i + dims/2), or (2i, 2i+1) when traditional, rotated; the features
// past `dims` copied. x and o may be the same row.
inline void rope_row(
    const float* x, float* o, const float* cs, const float* sn, int dims, int D, bool trad) {
  const int half = dims / 2;
  for (int i = 0; i < half; ++i) {
    const int i1 = trad ? 2 * i : i, i2 = trad ? 2 * i + 1 : i + half;
    const float x1 = x[i1], x2 = x[i2];
    o[i1] = x1 * cs[i] - x2 * sn[i];
    o[i2] = x1 * sn[i] + x2 * cs[i];
  }
  if (o != x) {
    for (int i = dims; i < D; ++i) o[i] = x[i];
  }
}

#ifdef LATENT_X86
__attribute__((target("avx2,fma"))) inline void swiglu_avx2(
    const float* g, const float* u, float* o, int64_t a, int64_t b) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = a;
  for (; i + 8 <= b; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    // sigmoid(x) = 1 / (1 + e^-x), with e^-|x| (always <= 1) so the exp never overflows
    const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 e = latent_attention::exp_neg(_mm256_sub_ps(_mm256_setzero_ps(), ax));
    const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e));  // sigmoid(|x|)
    // x < 0: e^-|x| / (1 + e^-|x|), not 1 - sigmoid(|x|), which cancels to 0
    const __m256 sig = _mm256_blendv_ps(pos, _mm256_mul_ps(e, pos), x);
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
  for (; i < b; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
#endif

// silu(g) * u over [a, b).
inline void swiglu_range(const float* g, const float* u, float* o, int64_t a, int64_t b) {
#ifdef LATENT_X86
  if (has_avx2()) {
    swiglu_avx2(g, u, o, a, b);
    return;
  }
#endif
  for (int64_t i = a; i < b; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// silu(g) * u, elementwise (the SwiGLU activation): MLX's CPU sigmoid runs a scalar exp at
// ~30 M elements/s here, which made the activation of a prompt chunk cost as much as its GEMMs.
class SwiGLU : public CpuPrimitive {
 public:
  explicit SwiGLU(mx::Stream stream) : CpuPrimitive(stream, "LatentSwiGLU") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    enc.dispatch([g = mx::array::unsafe_weak_copy(inputs[0]),
                  u = mx::array::unsafe_weak_copy(inputs[1]),
                  out = mx::array::unsafe_weak_copy(out)]() mutable {
      std::vector<float> gk, uk;
      const float* gd = rows_of(g, gk);
      const float* ud = rows_of(u, uk);
      float* od = out.data<float>();
      const int64_t n = out.size();
      const int64_t per = 16 * 1024;
      const int chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(64, n / per)));
      pool().run(chunks, [&](int c) {
        const int64_t a = n * c / chunks, b = n * (c + 1) / chunks;
        swiglu_range(gd, ud, od, a, b);
      });
    });
  }

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto fn = [=](const std::vector<mx::array>& in) {
      auto sig = mx::sigmoid(in[0], s);
      return std::vector<mx::array>{mx::multiply(mx::multiply(in[0], sig, s), in[1], s)};
    };
    return vjp_through(fn, primals, cotangents, argnums);
  }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

};

// Small per-token ops whose MLX CPU paths are composed graphs (rms_norm ~26 us, rope ~60 us a
// call here: ~5 ms of an 18 ms decode step over 30 layers): one primitive each.
// x * rsqrt(mean(x^2) + eps) * weight over the last axis.
class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : CpuPrimitive(stream, "LatentRmsNorm"), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    enc.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                  w = mx::array::unsafe_weak_copy(inputs[1]),
                  out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable {
      std::vector<float> keep;
      const float* xd = rows_of(x, keep);
      const float* wd = w.data<float>();
      float* od = out.data<float>();
      const int64_t D = x.shape(-1), rows = x.size() / D;
      for (int64_t r = 0; r < rows; ++r) rms_norm_row(xd + r * D, wd, od + r * D, D, eps);
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    float eps = eps_;
    auto fn = [=](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{mx::fast::rms_norm(in[0], in[1], eps, s)};
    };
    return vjp_through(fn, primals, cotangents, argnums);
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
};

// Rotary embedding of (B, H, L, D) at positions offset + l: the first `dims` features rotate
// in pairs (i, i + dims/2), or (2i, 2i+1) when traditional, by angle p * scale / period[i].
class Rope : public CpuPrimitive {
 public:
  Rope(mx::Stream stream, int dims, bool traditional, float scale, int offset)
      : CpuPrimitive(stream, "LatentRope"), dims_(dims), traditional_(traditional), scale_(scale),
        offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    // inputs[2], when present: one int32 offset per batch row (added to offset_)
    const bool per_row = inputs.size() > 2;
    enc.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                  periods = mx::array::unsafe_weak_copy(inputs[1]),
                  rows = mx::array::unsafe_weak_copy(per_row ? inputs[2] : inputs[1]),
                  out = mx::array::unsafe_weak_copy(out), dims = dims_, trad = traditional_,
                  scale = scale_, offset = offset_, per_row]() mutable {
      const int B = x.shape(0), H = x.shape(1), L = x.shape(2), D = x.shape(3);
      const auto st = x.strides();
      std::vector<float> keep;
      const float* xd = x.data<float>();
      int64_t sb = st[0], sh = st[1], sl = st[2];
      if (st[3] != 1) {
        keep = gather_rows(x);
        xd = keep.data();
        sb = int64_t(H) * L * D, sh = int64_t(L) * D, sl = D;
      }
      const int half = dims / 2;
      const float* per = periods.data<float>();
      // cos/sin once per (row's position, pair), shared by every head
      const int nb = per_row ? B : 1;
      std::vector<float> cs(size_t(nb) * L * half), sn(size_t(nb) * L * half);
      for (int b = 0; b < nb; ++b) {
        const int start = offset + (per_row ? rows.data<int32_t>()[b] : 0);
        for (int l = 0; l < L; ++l) {
          const size_t t = (size_t(b) * L + l) * half;
          rope_angles(float(start + l) * scale, per, half, cs.data() + t, sn.data() + t);
        }
      }
      float* od = out.data<float>();
      for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
          for (int l = 0; l < L; ++l) {
            const float* xr = xd + b * sb + h * sh + l * sl;
            float* o = od + ((int64_t(b) * H + h) * L + l) * D;
            const size_t t = (size_t(per_row ? b : 0) * L + l) * half;
            rope_row(xr, o, cs.data() + t, sn.data() + t, dims, D, trad);
          }
        }
      }
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    int dims = dims_, offset = offset_;
    bool trad = traditional_;
    float scale = scale_;
    auto fn = [=](const std::vector<mx::array>& in) {
      if (in.size() > 2) {
        auto off = mx::add(in[2], mx::array(offset), s);
        return std::vector<mx::array>{
            mx::fast::rope(in[0], dims, trad, std::nullopt, scale, off, in[1], s)};
      }
      return std::vector<mx::array>{
          mx::fast::rope(in[0], dims, trad, std::nullopt, scale, offset, in[1], s)};
    };
    return vjp_through(fn, primals, cotangents, argnums);
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && scale_ == o.scale_ &&
        offset_ == o.offset_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int dims_;
  bool traditional_;
  float scale_;
  int offset_;
};

// x - logsumexp(x) over the last axis (the log-probabilities of one step's logits).
class LogSoftmax : public CpuPrimitive {
 public:
  explicit LogSoftmax(mx::Stream stream) : CpuPrimitive(stream, "LatentLogSoftmax") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    enc.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                  out = mx::array::unsafe_weak_copy(out)]() mutable {
      std::vector<float> keep;
      const float* xd = rows_of(x, keep);
      float* od = out.data<float>();
      const int64_t V = x.shape(-1), rows = x.size() / V;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xd + r * V;
        float m = -INFINITY;
        for (int64_t i = 0; i < V; ++i) m = std::max(m, xr[i]);
        const double lse = double(m) + std::log(sum_exp(xr, V, m));
        for (int64_t i = 0; i < V; ++i) od[r * V + i] = float(double(xr[i]) - lse);
      }
    });
  }
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto s = stream();
    auto fn = [=](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{
          mx::subtract(in[0], mx::logsumexp(in[0], -1, true, s), s)};
    };
    return vjp_through(fn, primals, cotangents, argnums);
  }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  static double sum_exp(const float* x, int64_t n, float m) {
    int64_t i = 0;
    double total = 0.0;
#ifdef LATENT_X86
    if (has_avx2()) total = sum_exp_avx2(x, n, m, i);
#endif
    for (; i < n; ++i) total += std::exp(double(x[i]) - m);
    return total;
  }
#ifdef LATENT_X86
  __attribute__((target("avx2,fma"))) static double sum_exp_avx2(
      const float* x, int64_t n, float m, int64_t& i) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
      acc = _mm256_add_ps(acc, latent_attention::exp_neg(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    double t = 0.0;
    for (float v : lanes) t += v;
    return t;
  }
#endif
};

void check_format(
    const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
    int bits) {
  if (bits != 4 && bits != 8) {
    throw std::invalid_argument("[latent qmm] only 4- and 8-bit weights are supported");
  }
  if (group_size % 32 != 0 || group_size <= 0) {
    throw std::invalid_argument("[latent qmm] group_size must be a positive multiple of 32");
  }
  if (scales.dtype() != mx::float32 && scales.dtype() != mx::float16 &&
      scales.dtype() != mx::bfloat16) {
    throw std::invalid_argument("[latent qmm] scales must be float32, float16 or bfloat16");
  }
  if (w.ndim() != 2 || w.dtype() != mx::uint32) {
    throw std::invalid_argument("[latent qmm] weights must be a 2-D uint32 array");
  }
  const int K = w.shape(1) * 32 / bits;
  if (K % group_size != 0 || scales.ndim() != 2 || scales.shape(0) != w.shape(0) ||
      scales.shape(1) != K / group_size || biases.shape() != scales.shape() ||
      biases.dtype() != scales.dtype()) {
    throw std::invalid_argument("[latent qmm] scales/biases do not match the weights' groups");
  }
}

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s, mx::Device::cpu);
  if (stream.device.type != mx::Device::DeviceType::cpu) {
    throw std::invalid_argument("[latent qmm] runs on the CPU only");
  }
  return stream;
}

mx::array dequantize_f32(
    const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
    int bits, mx::StreamOrDevice s) {
  check_format(w, scales, biases, group_size, bits);
  auto stream = cpu_stream(s);
  return mx::array(
      {w.shape(0), w.shape(1) * 32 / bits}, mx::float32,
      std::make_shared<DequantizeF32>(stream, group_size, bits),
      {packed(w, stream), packed(scales, stream), packed(biases, stream)});
}

mx::array qmm_rows(
    const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
    int group_size, int bits, mx::StreamOrDevice s) {
  check_format(w, scales, biases, group_size, bits);
  if (x.dtype() != mx::float32) {
    throw std::invalid_argument("[latent qmm] activations must be float32");
  }
  const int K = w.shape(1) * 32 / bits;
  if (x.ndim() < 1 || x.shape(-1) != K) {
    throw std::invalid_argument("[latent qmm] activations' last dimension must equal K");
  }
  auto stream = cpu_stream(s);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(
      shape, mx::float32, std::make_shared<QuantizedRowsMatmul>(stream, group_size, bits),
      {x, packed(w, stream), packed(scales, stream), packed(biases, stream)});
}


mx::array attention(
    const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
    mx::StreamOrDevice s) {
  for (const auto* a : {&q, &k, &v}) {
    if (a->ndim() != 4 || (a->dtype() != mx::float32 && (a == &q || a->dtype() != mx::float16))) {
      throw std::invalid_argument(
          "[latent attention] q (float32), k, v (float32 or float16) must be 4-D arrays");
    }
  }
  if (k.dtype() != v.dtype()) {
    throw std::invalid_argument("[latent attention] k and v must have one dtype");
  }
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(1) != v.shape(1) ||
      k.shape(2) != v.shape(2) || q.shape(3) != k.shape(3) || q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument("[latent attention] q, k, v shapes do not fit together");
  }
  if (causal && q.shape(2) > k.shape(2)) {
    throw std::invalid_argument("[latent attention] more queries than keys with a causal mask");
  }
  auto stream = cpu_stream(s);
  auto shape = q.shape();
  shape.back() = v.shape(3);
  return mx::array(
      shape, mx::float32, std::make_shared<CpuAttention>(stream, scale, causal), {q, k, v});
}


mx::array swiglu(const mx::array& g, const mx::array& u, mx::StreamOrDevice s) {
  if (g.dtype() != mx::float32 || u.dtype() != mx::float32 || g.shape() != u.shape()) {
    throw std::invalid_argument("[latent swiglu] g and u must be float32 arrays of one shape");
  }
  return mx::array(g.shape(), mx::float32, std::make_shared<SwiGLU>(cpu_stream(s)), {g, u});
}


mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 1 ||
      x.ndim() < 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("[latent rms_norm] float32 x (..., D) and weight (D,) expected");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(cpu_stream(s), eps),
                   {x, packed(w, cpu_stream(s))});
}

mx::array rope(const mx::array& x, int dims, bool traditional, const mx::array& periods,
               float scale, int offset, const std::optional<mx::array>& rows,
               mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() != 4 || dims % 2 != 0 || dims > x.shape(3) ||
      periods.dtype() != mx::float32 || periods.ndim() != 1 || periods.shape(0) != dims / 2) {
    throw std::invalid_argument(
        "[latent rope] float32 x (B, H, L, D), even dims <= D and float32 periods (dims/2,)");
  }
  auto stream = cpu_stream(s);
  std::vector<mx::array> in = {x, packed(periods, stream)};
  if (rows) {
    if (rows->dtype() != mx::int32 || rows->ndim() != 1 || rows->shape(0) != x.shape(0)) {
      throw std::invalid_argument("[latent rope] row offsets must be int32 of shape (B,)");
    }
    in.push_back(mx::contiguous(*rows, false, stream));
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<Rope>(stream, dims, traditional, scale, offset),
                   std::move(in));
}

#include "decode.h"

mx::array log_softmax(const mx::array& x, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw std::invalid_argument("[latent log_softmax] a float32 array expected");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<LogSoftmax>(cpu_stream(s)), {x});
}

}  // namespace

NB_MODULE(_latent_cpu, m) {
  m.doc() = "Latent Studio CPU kernels for MLX affine-quantized weights";
  m.def(
      "qmm_rows",
      [](const mx::array& x, const mx::array& w, const mx::array& scales,
         const mx::array& biases, int group_size, int bits) {
        return qmm_rows(x, w, scales, biases, group_size, bits, {});
      },
      nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"),
      nb::arg("bits"), "x @ dequantize(w).T in float32, for a few rows of x");
  m.def(
      "dequantize_f32",
      [](const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
         int bits) { return dequantize_f32(w, scales, biases, group_size, bits, {}); },
      nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("group_size"),
      nb::arg("bits"), "dequantize(w) as float32");
  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal) {
        return attention(q, k, v, scale, causal, {});
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"), nb::arg("causal"),
      "softmax(q k^T scale [+ causal mask]) v for float32 (B, H, L, D) arrays");
  m.def(
      "swiglu", [](const mx::array& g, const mx::array& u) { return swiglu(g, u, {}); },
      nb::arg("g"), nb::arg("u"), "silu(g) * u for float32 arrays of one shape");
  m.def(
      "rms_norm",
      [](const mx::array& x, const mx::array& w, float eps) { return rms_norm(x, w, eps, {}); },
      nb::arg("x"), nb::arg("weight"), nb::arg("eps"), "x * rsqrt(mean(x^2) + eps) * weight");
  m.def(
      "rope",
      [](const mx::array& x, int dims, bool traditional, const mx::array& periods, float scale,
         int offset, const std::optional<mx::array>& rows) {
        return rope(x, dims, traditional, periods, scale, offset, rows, {});
      },
      nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("periods"), nb::arg("scale"),
      nb::arg("offset"), nb::arg("rows") = nb::none(),
      "rotary embedding of (B, H, L, D) at positions offset..offset+L-1 (+ rows[b], int32)");
  m.def(
      "log_softmax", [](const mx::array& x) { return log_softmax(x, {}); }, nb::arg("x"),
      "x - logsumexp(x) over the last axis");
  using latent_decode::Opt;
  m.def(
      "decode_qkv",
      [](const mx::array& h, const mx::array& pos, const mx::array& norm,
         const std::vector<Opt>& linears, const std::vector<int>& bits,
         const std::vector<int>& groups, const Opt& q_norm, const Opt& k_norm,
         const mx::array& periods, int n_heads, int n_kv_heads, int head_dim, float eps,
         int rope_dims, bool traditional, float rope_scale, float mscale) {
        return decode_qkv(h, pos, norm, linears, bits, groups, q_norm, k_norm, periods, n_heads,
                          n_kv_heads, head_dim, eps, rope_dims, traditional, rope_scale, mscale,
                          {});
      },
      nb::arg("h"), nb::arg("pos"), nb::arg("norm"), nb::arg("linears"), nb::arg("bits"),
      nb::arg("groups"), nb::arg("q_norm").none(), nb::arg("k_norm").none(), nb::arg("periods"),
      nb::arg("n_heads"), nb::arg("n_kv_heads"), nb::arg("head_dim"), nb::arg("eps"),
      nb::arg("rope_dims"), nb::arg("traditional"), nb::arg("rope_scale"), nb::arg("mscale"),
      "one token's q, k (normed, rotated at pos) and v of a llama-family layer: (Hq+2Hkv)*Dh");
  m.def(
      "kv_write",
      [](const mx::array& buf, const mx::array& qkv, const mx::array& pos, int start) {
        return kv_write(buf, qkv, pos, start, {});
      },
      nb::arg("buf"), nb::arg("qkv"), nb::arg("pos"), nb::arg("start"),
      "buf (1, H, S, D) with position pos of each head set from qkv[start:], in place if possible");
  m.def(
      "decode_rest",
      [](const mx::array& h, const mx::array& qkv, const mx::array& keys, const mx::array& values,
         const mx::array& pos, const std::vector<Opt>& linears, const std::vector<int>& bits,
         const std::vector<int>& groups, const mx::array& norm, int n_heads, float eps,
         float attn_scale) {
        return decode_rest(h, qkv, keys, values, pos, linears, bits, groups, norm, n_heads, eps,
                           attn_scale, {});
      },
      nb::arg("h"), nb::arg("qkv"), nb::arg("keys"), nb::arg("values"), nb::arg("pos"),
      nb::arg("linears"), nb::arg("bits"), nb::arg("groups"), nb::arg("norm"), nb::arg("n_heads"),
      nb::arg("eps"), nb::arg("attn_scale"),
      "h + attention + o projection, then the SwiGLU MLP block, for one token");
  m.def(
      "kv_write_copies", [] { return latent_decode::kv_write_copies.load(); },
      "kv_write calls so far that copied their buffer instead of writing in place");
  m.def(
      "set_decode_profiling",
      [](bool on) {
        for (auto& t : latent_decode::stage_ns) t.store(0);
        latent_decode::profiling.store(on);
      },
      nb::arg("on"), "start (zeroing the sums) or stop timing the fused decode kernels' stages");
  m.def(
      "decode_profile",
      [] {
        nb::dict d;
        for (int i = 0; i < latent_decode::kStages; ++i) {
          d[latent_decode::stage_names[i]] = latent_decode::stage_ns[i].load() / 1e6;
        }
        return d;
      },
      "milliseconds per fused-decode stage since set_decode_profiling(True)");
  m.def("num_threads", [] { return pool().size(); }, "threads a kernel call uses");
  m.def(
      "set_num_threads", [](int n) { pool().resize(std::max(1, n)); }, nb::arg("n"),
      "set the threads a kernel call uses (1 = the calling thread only)");
  m.def("simd", [] { return has_avx2() ? "avx2" : "portable"; }, "the code path in use");
}

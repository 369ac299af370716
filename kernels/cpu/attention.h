// Causal (or full) scaled dot-product attention on the CPU, for float32 q/k/v: one MLX primitive
// instead of MLX's composed CPU path (matmul, mask, softmax with a scalar exp, matmul), which
// spent ~45% of a prompt chunk's time here. Included by qmatmul.cpp (one extension module).
//
//   q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, L, Dv); Hq % Hkv == 0.
//   causal: query i sits at position S - L + i and sees keys j <= S - L + i (MLX's "causal",
//   aligned to the end of the keys, so it is right with a cache holding S - L earlier tokens).
//
// Work item = 8 query rows of one head. Scores for the 8 rows are computed key by key with the
// rows held transposed in registers (no horizontal sums), keys past the causal limit of the
// block's last row are never touched, softmax uses a polynomial exp (relative error ~1e-7),
// then P·V row by row. k and v may be strided views (a KV cache's buffers): only the last
// dimension must be contiguous.

#pragma once

namespace latent_attention {

constexpr int QB = 8;  // query rows per work item

// K/V element types: float32, or float16 held as its bits (a float16 KV cache).
using Half = uint16_t;

template <typename T>
struct ViewT {
  const T* data;
  int64_t sb, sh, ss;  // strides (elements) of batch, head, sequence; last dim contiguous
  const T* row(int b, int h, int s) const { return data + b * sb + h * sh + s * ss; }
  ViewT from(int k0) const { return {data + k0 * ss, sb, sh, ss}; }  // keys k0.. of each head
};
using View = ViewT<float>;

inline float to_float(float x) { return x; }
inline float to_float(Half h) {
  mx::float16_t v;
  std::memcpy(&v, &h, sizeof(h));
  return static_cast<float>(v);
}

#ifdef LATENT_X86
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// e^x for x <= 0 (after subtracting the row max); Cephes-style range reduction + polynomial.
__attribute__((target("avx2,fma"))) inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two for accuracy
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // multiply by 2^n through the exponent bits
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Scores of QB query rows (transposed in qt: qt[d*QB + r]) against keys [0, n): s[j*QB + r].
// Four keys at a time: each key's sum is a chain of dependent FMAs, so one key alone would wait
// on FMA latency (measured 3-4x slower than four interleaved chains).
__attribute__((target("avx2,fma"))) inline void scores_block(
    const float* qt, const View& k, int b, int h, int n, int D, float* s) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k.row(b, h, j);
    const float* k1 = k.row(b, h, j + 1);
    const float* k2 = k.row(b, h, j + 2);
    const float* k3 = k.row(b, h, j + 3);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m256 q = _mm256_loadu_ps(qt + d * QB);
      a0 = _mm256_fmadd_ps(q, _mm256_broadcast_ss(k0 + d), a0);
      a1 = _mm256_fmadd_ps(q, _mm256_broadcast_ss(k1 + d), a1);
      a2 = _mm256_fmadd_ps(q, _mm256_broadcast_ss(k2 + d), a2);
      a3 = _mm256_fmadd_ps(q, _mm256_broadcast_ss(k3 + d), a3);
    }
    _mm256_storeu_ps(s + j * QB, a0);
    _mm256_storeu_ps(s + (j + 1) * QB, a1);
    _mm256_storeu_ps(s + (j + 2) * QB, a2);
    _mm256_storeu_ps(s + (j + 3) * QB, a3);
  }
  for (; j < n; ++j) {
    const float* kr = k.row(b, h, j);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int d = 0;
    for (; d + 1 < D; d += 2) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + d * QB), _mm256_broadcast_ss(kr + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + (d + 1) * QB), _mm256_broadcast_ss(kr + d + 1), a1);
    }
    for (; d < D; ++d) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qt + d * QB), _mm256_broadcast_ss(kr + d), a0);
    }
    _mm256_storeu_ps(s + j * QB, _mm256_add_ps(a0, a1));
  }
}

// The same scores for R <= 4 query rows given row by row (q + r*D, D a multiple of 8): dot
// products along d, four keys at a time. One-token decoding of a small GQA group (SmolLM2: 3
// query heads a K/V head) fills few of the QB lanes above, which then do 8/R times the work.
// Columns R..QB-1 of s are left unset.
template <int R, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void scores_rows(
    const float* q, const ViewT<T>& k, int b, int h, int n, int D, float* s) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < 4; ++t) acc[r][t] = _mm256_setzero_ps();
    const T* kr[4] = {k.row(b, h, j), k.row(b, h, j + 1), k.row(b, h, j + 2), k.row(b, h, j + 3)};
    for (int d = 0; d < D; d += 8) {
      __m256 kv[4];
      for (int t = 0; t < 4; ++t) kv[t] = load8(kr[t] + d);
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + r * D + d);
        for (int t = 0; t < 4; ++t) acc[r][t] = _mm256_fmadd_ps(qv, kv[t], acc[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      // four horizontal sums at once: (k0 k1 k2 k3) for row r
      const __m256 h01 = _mm256_hadd_ps(acc[r][0], acc[r][1]);
      const __m256 h23 = _mm256_hadd_ps(acc[r][2], acc[r][3]);
      const __m256 h = _mm256_hadd_ps(h01, h23);
      const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      alignas(16) float out[4];
      _mm_store_ps(out, sum);
      for (int t = 0; t < 4; ++t) s[(j + t) * QB + r] = out[t];
    }
  }
  for (; j < n; ++j) {
    const T* kj = k.row(b, h, j);
    for (int r = 0; r < R; ++r) {
      __m256 a = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), load8(kj + d), a);
      }
      s[j * QB + r] = hsum8(a);
    }
  }
}

// out[0, 8*NV) = sum_j p[j*QB + r] * v_j[c0, c0 + 8*NV): NV accumulators held in registers
// (an array indexed at run time lived on the stack, and each key waited on a store-to-load
// round trip).
template <int NV, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void pv_tile(
    const float* p, int r, const ViewT<T>& v, int b, int h, int n, int c0, float* out) {
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const float w = p[j * QB + r];
    if (w == 0.f) continue;
    const __m256 wb = _mm256_set1_ps(w);
    const T* vr = v.row(b, h, j) + c0;
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(wb, load8(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// out row = sum_j p[j*QB + r] * v_j for the keys [0, n), Dv a multiple of 8 (<= 256).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline void pv_row(
    const float* p, int r, const ViewT<T>& v, int b, int h, int n, int Dv, float* out) {
  for (int c0 = 0; c0 < Dv; c0 += 64) {
    switch (std::min(8, (Dv - c0) / 8)) {
      case 8: pv_tile<8, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 7: pv_tile<7, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 6: pv_tile<6, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 5: pv_tile<5, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 4: pv_tile<4, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 3: pv_tile<3, T>(p, r, v, b, h, n, c0, out + c0); break;
      case 2: pv_tile<2, T>(p, r, v, b, h, n, c0, out + c0); break;
      default: pv_tile<1, T>(p, r, v, b, h, n, c0, out + c0); break;
    }
  }
}

// pv_row for R <= 4 rows at once: each V vector is loaded (and converted, for float16) once for
// all the rows instead of once a row. The same FMAs in the same order as pv_row, so the same bits.
template <int R, int NV, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void pv_rows_tile(
    const float* p, const ViewT<T>& v, int b, int h, int n, int c0, float* const* out) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const T* vr = v.row(b, h, j) + c0;
    __m256 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load8(vr + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 wb = _mm256_set1_ps(p[j * QB + r]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_fmadd_ps(wb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out[r] + c0 + 8 * c, acc[r][c]);
}

template <int R, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void pv_rows_r(
    const float* p, const ViewT<T>& v, int b, int h, int n, int Dv, float* const* out) {
  constexpr int NV = R <= 3 ? 4 : 2;  // R*NV accumulators + NV loads within 16 registers
  int c0 = 0;
  for (; c0 + 8 * NV <= Dv; c0 += 8 * NV) pv_rows_tile<R, NV, T>(p, v, b, h, n, c0, out);
  for (; c0 < Dv; c0 += 8) pv_rows_tile<R, 1, T>(p, v, b, h, n, c0, out);
}

// out[r] = sum_j p[j*QB + r] * v_j for rows r < rows (Dv a multiple of 8, <= 256).
template <typename T>
inline void pv_rows(const float* p, int rows, const ViewT<T>& v, int b, int h, int n, int Dv,
                    float* const* out) {
  switch (rows) {
    case 1: pv_rows_r<1, T>(p, v, b, h, n, Dv, out); return;
    case 2: pv_rows_r<2, T>(p, v, b, h, n, Dv, out); return;
    case 3: pv_rows_r<3, T>(p, v, b, h, n, Dv, out); return;
    case 4: pv_rows_r<4, T>(p, v, b, h, n, Dv, out); return;
    default:
      for (int r = 0; r < rows; ++r) pv_row(p, r, v, b, h, n, Dv, out[r]);
  }
}

// Column-wise softmax of s (n keys x QB rows) in place. With m_out/l_out given, the columns are
// left unnormalised: exp(x - max), with each column's max and sum returned (for combining the
// partial results of key ranges).
__attribute__((target("avx2,fma"))) inline void softmax_cols(
    float* s, int n, const int* limit, float scale, float* m_out = nullptr,
    float* l_out = nullptr) {
  // column r holds query row r; keys j > limit[r] get probability 0
  alignas(32) float mx_[QB];
  __m256 m = _mm256_set1_ps(-INFINITY);
  alignas(32) int lim[QB];
  for (int r = 0; r < QB; ++r) lim[r] = limit[r];
  const __m256i limv = _mm256_load_si256(reinterpret_cast<const __m256i*>(lim));
  const __m256 sc = _mm256_set1_ps(scale);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (int j = 0; j < n; ++j) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j * QB), sc);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(j), limv));
    x = _mm256_blendv_ps(x, ninf, keep);  // keep mask is "j > limit": masked out
    _mm256_storeu_ps(s + j * QB, x);
    m = _mm256_max_ps(m, x);
  }
  _mm256_store_ps(mx_, m);
  __m256 sum = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j * QB), m));
    e = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(j), limv)));
    _mm256_storeu_ps(s + j * QB, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (m_out) {
    _mm256_storeu_ps(m_out, m);
    _mm256_storeu_ps(l_out, sum);
    return;
  }
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
  for (int j = 0; j < n; ++j) _mm256_storeu_ps(s + j * QB, _mm256_mul_ps(_mm256_loadu_ps(s + j * QB), inv));
}
#endif

// Portable path: one query row at a time, std::exp.
template <typename T>
inline void attend_row_portable(
    const float* q, const ViewT<T>& k, const ViewT<T>& v, int b, int h, int n, int D, int Dv,
    float scale, float* out, std::vector<float>& s) {
  s.resize(n);
  float m = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const T* kr = k.row(b, h, j);
    float dot = 0.f;
    for (int d = 0; d < D; ++d) dot += q[d] * to_float(kr[d]);
    s[j] = dot * scale;
    m = std::max(m, s[j]);
  }
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  for (int c = 0; c < Dv; ++c) out[c] = 0.f;
  for (int j = 0; j < n; ++j) {
    const float w = s[j] / sum;
    const T* vr = v.row(b, h, j);
    for (int c = 0; c < Dv; ++c) out[c] += w * to_float(vr[c]);
  }
}

// softmax(q k^T scale) v for the Hq query heads of one token over keys [0, n) of the cache.
// Work items are (K/V head, block of up to QB of its query heads, key range): splitting the keys
// keeps both threads busy when there are few K/V heads (SmolLM2: 3); each range returns its
// unnormalised sums with their max and total, combined afterwards (the flash-decoding scheme).
// q: (Hq, Dh) contiguous; kv/vv: batch row 0 of the cache views; out: (Hq, Dv).
struct Heads {
  int Hq, Hkv, Dh, Dv;
};

template <typename T>
inline void decode_attention(const float* q, const ViewT<T>& kv, const ViewT<T>& vv, int n,
                             Heads s, float scale, float* out) {
  const int group = s.Hq / s.Hkv;
  const int blocks = (group + QB - 1) / QB;
  const bool simd = has_avx2() && s.Dv % 8 == 0 && s.Dv <= 256;
  Pool& p = pool();
  if (n <= 0) return;
  // key ranges of >= 64 keys, enough for ~4 items per thread
  const int want = (4 * p.size() + s.Hkv * blocks - 1) / (s.Hkv * blocks);
  const int splits = simd ? std::max(1, std::min(want, n / 64)) : 1;
  const int items = s.Hkv * blocks * splits;
  // per item and row: the unnormalised output, the max and the sum of its range
  std::vector<float> part(size_t(items) * QB * s.Dv), pmax(size_t(items) * QB),
      psum(size_t(items) * QB);
  p.run(items, [&](int it) {
    const int sp = it % splits, hk = it / (splits * blocks), r0 = ((it / splits) % blocks) * QB;
    const int rows = std::min(QB, group - r0);
    std::vector<float> sbuf;
#ifdef LATENT_X86
    if (simd) {
      int k0, k1;
      split(n, splits, sp, k0, k1);
      const int len = k1 - k0;
      const ViewT<T> kr = kv.from(k0), vr = vv.from(k0);
      std::vector<float> qt(size_t(s.Dh) * QB);
      int limit[QB];
      for (int r = 0; r < QB; ++r) {
        const float* qrow = q + size_t(hk * group + r0 + std::min(r, rows - 1)) * s.Dh;
        for (int d = 0; d < s.Dh; ++d) qt[d * QB + r] = r < rows ? qrow[d] : 0.f;
        limit[r] = len - 1;
      }
      sbuf.resize(size_t(len) * QB);
      const float* q0 = q + size_t(hk * group + r0) * s.Dh;
      if (s.Dh % 8 == 0 && rows <= 4) {
        // the unused columns only need finite values for the softmax below
        for (int j = 0; j < len; ++j)
          for (int r = rows; r < QB; ++r) sbuf[size_t(j) * QB + r] = 0.f;
        switch (rows) {
          case 1: scores_rows<1, T>(q0, kr, 0, hk, len, s.Dh, sbuf.data()); break;
          case 2: scores_rows<2, T>(q0, kr, 0, hk, len, s.Dh, sbuf.data()); break;
          case 3: scores_rows<3, T>(q0, kr, 0, hk, len, s.Dh, sbuf.data()); break;
          default: scores_rows<4, T>(q0, kr, 0, hk, len, s.Dh, sbuf.data()); break;
        }
      } else if constexpr (std::is_same_v<T, float>) {
        scores_block(qt.data(), kr, 0, hk, len, s.Dh, sbuf.data());
      } else {  // float16 keys for a large group: this range's keys as float32 first
        std::vector<float> kf(size_t(len) * s.Dh);
        for (int j = 0; j < len; ++j)
          for (int d = 0; d < s.Dh; ++d) kf[size_t(j) * s.Dh + d] = to_float(kr.row(0, hk, j)[d]);
        const View kfv{kf.data(), 0, 0, s.Dh};
        scores_block(qt.data(), kfv, 0, 0, len, s.Dh, sbuf.data());
      }
      softmax_cols(sbuf.data(), len, limit, scale, &pmax[size_t(it) * QB],
                   &psum[size_t(it) * QB]);
      float* outs[QB];
      for (int r = 0; r < rows; ++r) outs[r] = &part[(size_t(it) * QB + r) * s.Dv];
      pv_rows(sbuf.data(), rows, vr, 0, hk, len, s.Dv, outs);
      return;
    }
#endif
    for (int r = 0; r < rows; ++r) {
      const size_t head = hk * group + r0 + r;
      attend_row_portable(q + head * s.Dh, kv, vv, 0, hk, n, s.Dh, s.Dv, scale,
                          out + head * s.Dv, sbuf);
    }
  });
  if (!simd) return;
  for (int hk = 0; hk < s.Hkv; ++hk) {
    for (int r = 0; r < group; ++r) {
      const int first = (hk * blocks + r / QB) * splits, row = r % QB;
      float m = -INFINITY;
      for (int sp = 0; sp < splits; ++sp) m = std::max(m, pmax[size_t(first + sp) * QB + row]);
      float* o = out + size_t(hk * group + r) * s.Dv;
      std::fill(o, o + s.Dv, 0.f);
      float total = 0.f;
      for (int sp = 0; sp < splits; ++sp) {
        const size_t at = size_t(first + sp) * QB + row;
        const float w = std::exp(pmax[at] - m);
        total += w * psum[at];
        const float* src = &part[at * s.Dv];
        for (int d = 0; d < s.Dv; ++d) o[d] += w * src[d];
      }
      for (int d = 0; d < s.Dv; ++d) o[d] /= total;
    }
  }
}

}  // namespace latent_attention

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

struct View {
  const float* data;
  int64_t sb, sh, ss;  // strides (elements) of batch, head, sequence; last dim contiguous
  const float* row(int b, int h, int s) const { return data + b * sb + h * sh + s * ss; }
};

#ifdef LATENT_X86
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
__attribute__((target("avx2,fma"))) inline void scores_block(
    const float* qt, const View& k, int b, int h, int n, int D, float* s) {
  for (int j = 0; j < n; ++j) {
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

// out row += sum_j p[j*QB + r] * v_j for the keys [0, n), Dv a multiple of 8 (<= 256).
__attribute__((target("avx2,fma"))) inline void pv_row(
    const float* p, int r, const View& v, int b, int h, int n, int Dv, float* out) {
  __m256 acc[32];
  const int nv = Dv / 8;
  for (int c = 0; c < nv; ++c) acc[c] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const float w = p[j * QB + r];
    if (w == 0.f) continue;
    const __m256 wb = _mm256_set1_ps(w);
    const float* vr = v.row(b, h, j);
    for (int c = 0; c < nv; ++c) acc[c] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(vr + 8 * c), acc[c]);
  }
  for (int c = 0; c < nv; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

__attribute__((target("avx2,fma"))) inline void softmax_cols(
    float* s, int n, const int* limit, float scale) {
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
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
  for (int j = 0; j < n; ++j) _mm256_storeu_ps(s + j * QB, _mm256_mul_ps(_mm256_loadu_ps(s + j * QB), inv));
}
#endif

// Portable path: one query row at a time, std::exp.
inline void attend_row_portable(
    const float* q, const View& k, const View& v, int b, int h, int n, int D, int Dv,
    float scale, float* out, std::vector<float>& s) {
  s.resize(n);
  float m = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const float* kr = k.row(b, h, j);
    float dot = 0.f;
    for (int d = 0; d < D; ++d) dot += q[d] * kr[d];
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
    const float* vr = v.row(b, h, j);
    for (int c = 0; c < Dv; ++c) out[c] += w * vr[c];
  }
}

}  // namespace latent_attention

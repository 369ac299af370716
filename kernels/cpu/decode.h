// One-token decoding of a llama-family layer in three MLX primitives instead of ~27 MLX ops.
// Included by qmatmul.cpp (one extension module), after the kernels it reuses.
//
// A decode step is ~90% dispatch at this model size: 30 layers x (7 tiny matvecs, 2 norms, 2
// RoPEs, 2 cache slice updates, attention, reshapes, transposes, adds), each queued on MLX's
// stream thread and each matvec a separate wake-up of the thread pool. Per layer these do the
// same math with 5 pool runs:
//
//   decode_qkv(h (1,1,D), pos () int32, norm (D,), q/k/v linears, [q_norm, k_norm], periods)
//       -> (Hq*Dh + 2*Hkv*Dh,) float32: q and k (per-head RMSNorm if given, rotated at `pos`),
//          then v, each head-major.
//   kv_write(buf (1, Hkv, Cap, Dh), qkv, pos, start) -> buf with position `pos` of head h set to
//       qkv[start + h*Dh : start + (h+1)*Dh]. The buffer is reused in place when nothing else
//       holds it (MLX's donation rule), else copied first: a saved prefix that shares the
//       buffer is never written through.
//   decode_rest(h, qkv, keys, values, pos, o, mlp_norm, gate, up, down) -> (1,1,D):
//       a = h + o(attention(q, keys[:pos+1], values[:pos+1]))
//       a + down(silu(gate(x)) * up(x)) with x = rms_norm(a).
//
// The position is an array, so one graph serves every step (mx.compile can trace it once per
// cache capacity). A linear is 4-/8-bit MLX affine (w, scales, biases) or dense float32 (w),
// each with an optional output bias.

#pragma once

namespace latent_decode {

// Time spent per stage, summed over calls (read by bench/profile_decode.py); only while
// `set_decode_profiling(true)`.
enum Stage { kQkv, kRope, kAttention, kOProj, kMlpUpGate, kMlpDown, kKvWrite, kStages };
inline const char* stage_names[kStages] = {
    "q/k/v matvecs", "norms + RoPE", "attention", "o matvec + residual", "gate/up matvecs + SwiGLU",
    "down matvec + residual", "cache writes"};
inline std::atomic<bool> profiling{false};
inline std::atomic<int64_t> stage_ns[kStages];

// Adds the time since the previous mark (or construction) to a stage.
struct StageClock {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  bool on = profiling.load(std::memory_order_relaxed);
  void mark(Stage s) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    stage_ns[s].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count(),
                          std::memory_order_relaxed);
    t = now;
  }
};

// Where one linear's arrays sit in a primitive's inputs (-1: absent), and its format.
struct LinSpec {
  int bits = 0;  // 4 or 8: MLX affine; 0: dense float32 (N, K)
  int group = 0;
  int w = -1, scales = -1, biases = -1, bias = -1;
};

// One linear's data at run time.
struct Lin {
  int bits = 0, group = 0, N = 0, K = 0;
  const void* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  mx::Dtype sdtype = mx::float32;
  const float* bias = nullptr;
};

inline Lin bind_linear(const LinSpec& s, const std::vector<mx::array>& in) {
  Lin l;
  l.bits = s.bits;
  l.group = s.group;
  const auto& w = in[s.w];
  l.N = w.shape(0);
  l.K = s.bits ? w.shape(1) * 32 / s.bits : w.shape(1);
  l.w = w.data<void>();
  if (s.bits) {
    l.scales = in[s.scales].data<void>();
    l.biases = in[s.biases].data<void>();
    l.sdtype = in[s.scales].dtype();
  }
  if (s.bias >= 0) l.bias = in[s.bias].data<float>();
  return l;
}

inline float dot(const float* a, const float* b, int K) {
#ifdef LATENT_X86
  if (has_avx2()) return dot_avx2(a, b, K);
#endif
  float t = 0.f;
  for (int k = 0; k < K; ++k) t += a[k] * b[k];
  return t;
}

// Rows [n0, n1) of y = x @ W^T for one linear (x prepared as `a` for quantized weights).
inline void linear_rows(const Lin& l, const Activations* a, const float* x, float* y, int n0,
                        int n1) {
  if (l.bits == 0) {
    const float* w = static_cast<const float*>(l.w);
    for (int n = n0; n < n1; ++n) y[n] = dot(w + size_t(n) * l.K, x, l.K);
    return;
  }
  with_scale_type(l.sdtype, [&](auto tag) {
    using S = decltype(tag);
    const auto* w = static_cast<const uint8_t*>(l.w);
    const auto* s = static_cast<const S*>(l.scales);
    const auto* b = static_cast<const S*>(l.biases);
#ifdef LATENT_X86
    if (has_avx2()) {
      qmm_rows_avx2<S>(*a, w, s, b, y, 1, l.N, l.K, l.group, l.bits, n0, n1);
      return;
    }
#endif
    qmm_rows_portable<S>(*a, w, s, b, y, 1, l.N, l.K, l.group, l.bits, n0, n1);
  });
}

struct Job {
  const Lin* lin;
  float* y;
};

// y_j = x @ W_j^T (+ bias_j) for every job (all reading the same x), in one pool run whose
// chunks cover all the weights.
inline void matvec(const float* x, const std::vector<Job>& jobs) {
  Pool& p = pool();
  std::vector<Activations> acts(jobs.size());
  std::vector<const Activations*> act(jobs.size(), nullptr);
  std::vector<int> first(jobs.size() + 1, 0);
  for (size_t j = 0; j < jobs.size(); ++j) {
    const Lin& l = *jobs[j].lin;
    if (l.bits) {
      const Lin* prev = j ? jobs[j - 1].lin : nullptr;
      if (prev && prev->bits == l.bits && prev->group == l.group && prev->K == l.K) {
        act[j] = act[j - 1];
      } else {
        acts[j] = prepare(x, 1, l.K, l.group, l.bits);
        act[j] = &acts[j];
      }
    }
    first[j + 1] = first[j] + chunks_for(l.N, l.K, p.size());
  }
  p.run(first.back(), [&](int c) {
    const size_t j = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    int n0, n1;
    split(jobs[j].lin->N, first[j + 1] - first[j], c - first[j], n0, n1);
    linear_rows(*jobs[j].lin, act[j], x, jobs[j].y, n0, n1);
  });
  for (const auto& job : jobs) {
    if (job.lin->bias) {
      for (int n = 0; n < job.lin->N; ++n) job.y[n] += job.lin->bias[n];
    }
  }
}

inline int position(const mx::array& pos) { return pos.data<int32_t>()[0]; }

// A primitive that runs Run(inputs, output, spec) on MLX's CPU stream (the inputs as weak copies,
// kept alive by MLX until the task has run).
template <typename Spec, void (*Run)(std::vector<mx::array>&, mx::array&, const Spec&)>
class SpecPrimitive : public CpuPrimitive {
 public:
  SpecPrimitive(mx::Stream stream, Spec spec, const char* name)
      : CpuPrimitive(stream, name), s_(spec) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin_eval(stream(), inputs, out);
    std::vector<mx::array> in;
    for (const auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
    enc.dispatch([in = std::move(in), out = mx::array::unsafe_weak_copy(out), s = s_]() mutable {
      Run(in, out, s);
    });
  }

 private:
  Spec s_;
};

struct QkvSpec {
  int Hq, Hkv, Dh, rope_dims;
  bool traditional;
  float eps, rope_scale, mscale;
  int norm, q_norm, k_norm, periods;  // input indices (-1: absent)
  LinSpec q, k, v;
};

inline void run_qkv(std::vector<mx::array>& in, mx::array& out, const QkvSpec& s) {
  StageClock clock;
    std::vector<float> keep;
    const float* h = rows_of(in[0], keep);
    const int pos = position(in[1]);
    const int D = in[0].shape(-1);
    std::vector<float> xn(D);
    rms_norm_row(h, in[s.norm].data<float>(), xn.data(), D, s.eps);
    const Lin q = bind_linear(s.q, in), k = bind_linear(s.k, in), v = bind_linear(s.v, in);
    float* o = out.data<float>();
    float* qo = o;
    float* ko = o + size_t(s.Hq) * s.Dh;
    matvec(xn.data(), {{&q, qo}, {&k, ko}, {&v, ko + size_t(s.Hkv) * s.Dh}});
    clock.mark(kQkv);
    const int half = s.rope_dims / 2;
    std::vector<float> cs(half), sn(half);
    rope_angles(float(pos) * s.rope_scale, in[s.periods].data<float>(), half, cs.data(),
                sn.data());
    auto heads = [&](float* base, int H, int norm) {
      for (int hh = 0; hh < H; ++hh) {
        float* r = base + size_t(hh) * s.Dh;
        if (norm >= 0) rms_norm_row(r, in[norm].data<float>(), r, s.Dh, s.eps);
        if (s.mscale != 1.0f) {
          for (int i = 0; i < s.Dh; ++i) r[i] *= s.mscale;
        }
        rope_row(r, r, cs.data(), sn.data(), s.rope_dims, s.Dh, s.traditional);
      }
    };
    heads(qo, s.Hq, s.q_norm);
    heads(ko, s.Hkv, s.k_norm);
    clock.mark(kRope);
}

using DecodeQkv = SpecPrimitive<QkvSpec, run_qkv>;

// How many kv_write calls had to copy their buffer (not in place): tests and benchmarks read it.
inline std::atomic<int64_t> kv_write_copies{0};

class KvWrite : public CpuPrimitive {
 public:
  KvWrite(mx::Stream stream, int start) : CpuPrimitive(stream, "LatentKvWrite"), start_(start) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& buf = inputs[0];
    // in place when the old buffer is ours alone (the cache let go of it), as MLX's own
    // slice updates do; otherwise write into a copy
    const bool donate = buf.is_donatable() && buf.flags().row_contiguous;
    if (donate) {
      out.copy_shared_buffer(buf);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      kv_write_copies.fetch_add(1, std::memory_order_relaxed);
    }
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([buf = mx::array::unsafe_weak_copy(buf),
                  src = mx::array::unsafe_weak_copy(inputs[1]),
                  pos = mx::array::unsafe_weak_copy(inputs[2]),
                  out = mx::array::unsafe_weak_copy(out), donate, start = start_]() mutable {
      StageClock clock;
      if (!donate) {
        if (buf.flags().row_contiguous) {
          std::memcpy(out.data<void>(), buf.data<void>(), out.nbytes());
        } else if (buf.dtype() == mx::float32) {
          const auto all = gather_rows(buf);
          std::memcpy(out.data<void>(), all.data(), out.nbytes());
        } else {
          const auto all = gather_rows(buf);
          auto* o = out.data<mx::float16_t>();
          for (size_t i = 0; i < all.size(); ++i) o[i] = static_cast<mx::float16_t>(all[i]);
        }
      }
      const int H = out.shape(1), cap = out.shape(2), Dh = out.shape(3);
      const int p = position(pos);
      if (p < 0 || p >= cap) return;  // the caller grows the buffer first; never write past it
      std::vector<float> skeep;
      const float* s = rows_of(src, skeep) + start;
      for (int h = 0; h < H; ++h) {
        const size_t at = (size_t(h) * cap + p) * Dh;
        if (out.dtype() == mx::float16) {  // a float16 cache: rounded to nearest
          auto* o = out.data<mx::float16_t>() + at;
          for (int d = 0; d < Dh; ++d) o[d] = static_cast<mx::float16_t>(s[size_t(h) * Dh + d]);
        } else {
          std::memcpy(out.data<float>() + at, s + size_t(h) * Dh, sizeof(float) * Dh);
        }
      }
      clock.mark(kKvWrite);
    });
  }

 private:
  int start_;
};

struct RestSpec {
  int Hq, Hkv, Dh, Dv, I;
  float eps, attn_scale;
  int norm;  // input index of the post-attention RMSNorm weight
  LinSpec o, gate, up, down;
};

inline void run_rest(std::vector<mx::array>& in, mx::array& out, const RestSpec& s) {
  StageClock clock;
  std::vector<float> keep[4];
  const float* h = rows_of(in[0], keep[0]);
  const float* qkv = rows_of(in[1], keep[1]);
  const int n = position(in[4]) + 1;
  const int D = in[0].shape(-1), cap = in[2].shape(2);
  float* a = out.data<float>();
  std::vector<float> att(size_t(s.Hq) * s.Dv), tmp(D), xn(D), g(s.I), u(s.I);
  if (n <= cap) {
    using namespace latent_attention;
    const Heads heads{s.Hq, s.Hkv, s.Dh, s.Dv};
    const int64_t kh = int64_t(cap) * s.Dh, vh = int64_t(cap) * s.Dv;
    if (in[2].dtype() == mx::float16 && in[2].flags().row_contiguous &&
        in[3].flags().row_contiguous) {  // a float16 cache, read as it is
      const ViewT<Half> kv{reinterpret_cast<const Half*>(in[2].data<mx::float16_t>()),
                           s.Hkv * kh, kh, s.Dh};
      const ViewT<Half> vv{reinterpret_cast<const Half*>(in[3].data<mx::float16_t>()),
                           s.Hkv * vh, vh, s.Dv};
      decode_attention(qkv, kv, vv, n, heads, s.attn_scale, att.data());
    } else {
      const View kv{rows_of(in[2], keep[2]), s.Hkv * kh, kh, s.Dh};
      const View vv{rows_of(in[3], keep[3]), s.Hkv * vh, vh, s.Dv};
      decode_attention(qkv, kv, vv, n, heads, s.attn_scale, att.data());
    }
  }
  clock.mark(kAttention);
  const Lin o = bind_linear(s.o, in), gate = bind_linear(s.gate, in), up = bind_linear(s.up, in),
            down = bind_linear(s.down, in);
  matvec(att.data(), {{&o, tmp.data()}});
  for (int i = 0; i < D; ++i) a[i] = h[i] + tmp[i];
  clock.mark(kOProj);
  rms_norm_row(a, in[s.norm].data<float>(), xn.data(), D, s.eps);
  matvec(xn.data(), {{&gate, g.data()}, {&up, u.data()}});
  swiglu_range(g.data(), u.data(), g.data(), 0, s.I);
  clock.mark(kMlpUpGate);
  matvec(g.data(), {{&down, tmp.data()}});
  for (int i = 0; i < D; ++i) a[i] += tmp[i];
  clock.mark(kMlpDown);
}

using DecodeRest = SpecPrimitive<RestSpec, run_rest>;

// ---------------------------------------------------------------------------------------
// Construction: checks, and the linears' arrays appended to a primitive's inputs.

using Opt = std::optional<mx::array>;

// Appends linear `name` (w, scales, biases, bias; absent ones None) to `in` and returns its
// spec; it must map K inputs to N outputs (N < 0: any).
inline LinSpec add_linear(const char* name, const std::vector<Opt>& parts, int bits, int group,
                          int K, int N, std::vector<mx::array>& in, mx::Stream stream) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("[latent decode] ") + name + ": " + why);
  };
  if (parts.size() != 4 || !parts[0]) fail("expected (w, scales, biases, bias) with w given");
  LinSpec s;
  s.bits = bits;
  s.group = group;
  const auto& w = *parts[0];
  if (bits) {
    if (!parts[1] || !parts[2]) fail("quantized weights need scales and biases");
    try {
      check_format(w, *parts[1], *parts[2], group, bits);
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
  } else if (w.ndim() != 2 || w.dtype() != mx::float32) {
    fail("dense weights must be a 2-D float32 array");
  }
  const int k = bits ? w.shape(1) * 32 / bits : w.shape(1);
  if (k != K || (N >= 0 && w.shape(0) != N)) {
    fail("weight shape does not fit the layer");
  }
  s.w = int(in.size());
  in.push_back(packed(w, stream));
  if (bits) {
    s.scales = int(in.size());
    in.push_back(packed(*parts[1], stream));
    s.biases = int(in.size());
    in.push_back(packed(*parts[2], stream));
  }
  if (parts[3]) {
    const auto& b = *parts[3];
    if (b.dtype() != mx::float32 || b.ndim() != 1 || b.shape(0) != w.shape(0)) {
      fail("the bias must be float32 of shape (N,)");
    }
    s.bias = int(in.size());
    in.push_back(packed(b, stream));
  }
  return s;
}

inline int add_vector(const mx::array& a, int n, const char* name, std::vector<mx::array>& in,
                      mx::Stream stream) {
  if (a.dtype() != mx::float32 || a.ndim() != 1 || a.shape(0) != n) {
    throw std::invalid_argument(std::string("[latent decode] ") + name +
                                " must be float32 of shape (" + std::to_string(n) + ",)");
  }
  in.push_back(packed(a, stream));
  return int(in.size()) - 1;
}

inline void check_pos(const mx::array& pos) {
  if (pos.dtype() != mx::int32 || pos.size() != 1) {
    throw std::invalid_argument("[latent decode] pos must be one int32");
  }
}

inline void check_token(const mx::array& h, const mx::array& pos) {
  if (h.dtype() != mx::float32 || h.size() != size_t(h.shape(-1))) {
    throw std::invalid_argument("[latent decode] h must be float32 holding one token (1, 1, D)");
  }
  check_pos(pos);
}

inline std::vector<Opt> part(const std::vector<Opt>& all, int i) {
  if (all.size() < size_t(4 * (i + 1))) {
    throw std::invalid_argument("[latent decode] each linear takes 4 entries (w, scales, biases, bias)");
  }
  return {all.begin() + 4 * i, all.begin() + 4 * (i + 1)};
}

}  // namespace latent_decode

mx::array decode_qkv(
    const mx::array& h, const mx::array& pos, const mx::array& norm,
    const std::vector<latent_decode::Opt>& linears, const std::vector<int>& bits,
    const std::vector<int>& groups, const latent_decode::Opt& q_norm,
    const latent_decode::Opt& k_norm, const mx::array& periods, int n_heads, int n_kv_heads,
    int head_dim, float eps, int rope_dims, bool traditional, float rope_scale, float mscale,
    mx::StreamOrDevice sd) {
  using namespace latent_decode;
  check_token(h, pos);
  if (bits.size() != 3 || groups.size() != 3 || n_heads % n_kv_heads != 0 ||
      rope_dims % 2 != 0 || rope_dims > head_dim) {
    throw std::invalid_argument("[latent decode_qkv] 3 linears (q, k, v), Hq % Hkv == 0, even rope dims <= head_dim");
  }
  auto stream = cpu_stream(sd);
  const int D = h.shape(-1);
  std::vector<mx::array> in = {h, packed(pos, stream)};
  QkvSpec s{n_heads, n_kv_heads, head_dim, rope_dims, traditional, eps, rope_scale, mscale,
            -1, -1, -1, -1, {}, {}, {}};
  s.norm = add_vector(norm, D, "norm", in, stream);
  s.periods = add_vector(periods, rope_dims / 2, "periods", in, stream);
  if (q_norm.has_value() != k_norm.has_value()) {
    throw std::invalid_argument("[latent decode_qkv] q_norm and k_norm come together");
  }
  if (q_norm) {
    s.q_norm = add_vector(*q_norm, head_dim, "q_norm", in, stream);
    s.k_norm = add_vector(*k_norm, head_dim, "k_norm", in, stream);
  }
  s.q = add_linear("q", part(linears, 0), bits[0], groups[0], D, n_heads * head_dim, in, stream);
  s.k = add_linear("k", part(linears, 1), bits[1], groups[1], D, n_kv_heads * head_dim, in, stream);
  s.v = add_linear("v", part(linears, 2), bits[2], groups[2], D, n_kv_heads * head_dim, in, stream);
  return mx::array({(n_heads + 2 * n_kv_heads) * head_dim}, mx::float32,
                   std::make_shared<DecodeQkv>(stream, s, "LatentDecodeQkv"), std::move(in));
}

mx::array kv_write(const mx::array& buf, const mx::array& qkv, const mx::array& pos, int start,
                   mx::StreamOrDevice sd) {
  if ((buf.dtype() != mx::float32 && buf.dtype() != mx::float16) || buf.ndim() != 4 ||
      buf.shape(0) != 1 ||
      qkv.dtype() != mx::float32 || qkv.ndim() != 1 || start < 0 ||
      size_t(start) + size_t(buf.shape(1)) * buf.shape(3) > qkv.size()) {
    throw std::invalid_argument(
        "[latent kv_write] float32/float16 buffer (1, H, S, D) and a float32 vector holding H*D "
        "from start");
  }
  latent_decode::check_pos(pos);
  auto stream = cpu_stream(sd);
  return mx::array(buf.shape(), buf.dtype(), std::make_shared<latent_decode::KvWrite>(stream, start),
                   {buf, qkv, packed(pos, stream)});
}

mx::array decode_rest(
    const mx::array& h, const mx::array& qkv, const mx::array& keys, const mx::array& values,
    const mx::array& pos, const std::vector<latent_decode::Opt>& linears,
    const std::vector<int>& bits, const std::vector<int>& groups, const mx::array& norm,
    int n_heads, float eps, float attn_scale, mx::StreamOrDevice sd) {
  using namespace latent_decode;
  check_token(h, pos);
  if (keys.dtype() != values.dtype()) {
    throw std::invalid_argument("[latent decode_rest] keys and values must have one dtype");
  }
  for (const auto* a : {&keys, &values}) {
    if ((a->dtype() != mx::float32 && a->dtype() != mx::float16) || a->ndim() != 4 ||
        a->shape(0) != 1) {
      throw std::invalid_argument(
          "[latent decode_rest] keys/values: float32 or float16 buffers (1, Hkv, S, D)");
    }
  }
  const int Hkv = keys.shape(1), Dh = keys.shape(3), Dv = values.shape(3);
  if (values.shape(1) != Hkv || values.shape(2) != keys.shape(2) || n_heads % Hkv != 0 ||
      qkv.dtype() != mx::float32 || qkv.ndim() != 1 || qkv.shape(0) < n_heads * Dh ||
      bits.size() != 4 || groups.size() != 4) {
    throw std::invalid_argument("[latent decode_rest] shapes of qkv, keys, values and heads do not fit");
  }
  auto stream = cpu_stream(sd);
  const int D = h.shape(-1);
  std::vector<mx::array> in = {h, qkv, keys, values, packed(pos, stream)};
  RestSpec s{n_heads, Hkv, Dh, Dv, 0, eps, attn_scale, -1, {}, {}, {}, {}};
  s.norm = add_vector(norm, D, "mlp norm", in, stream);
  s.o = add_linear("o", part(linears, 0), bits[0], groups[0], n_heads * Dv, D, in, stream);
  s.gate = add_linear("gate", part(linears, 1), bits[1], groups[1], D, -1, in, stream);
  s.I = in[s.gate.w].shape(0);
  s.up = add_linear("up", part(linears, 2), bits[2], groups[2], D, s.I, in, stream);
  s.down = add_linear("down", part(linears, 3), bits[3], groups[3], s.I, D, in, stream);
  return mx::array(h.shape(), mx::float32, std::make_shared<DecodeRest>(stream, s, "LatentDecodeRest"), std::move(in));
}

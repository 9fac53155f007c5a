// Decode-sized (a few tokens, float32, CPU) projections that read only the weight rows they use.
//
//   sparse_input_linear(x (T, K), wt (K, N), scale (K), threshold) -> y (T, N)
//     y[t] = sum over j with |x[t, j]| * scale[j] > threshold of x[t, j] * wt[j, :]
//     ("> threshold" reads "not <= threshold" throughout: a NaN score keeps its entry, so a
//     NaN input stays visible in the output, as in the dense layer)
//   neuron_ffn(x (T, H), g (T, F), w_up (F, H)?, b_up (F)?, w_down_t (F, O), coef (F),
//              threshold, activation) -> y (T, O)
//     a = act(g);  kept (t, i): |a[t, i]| * coef[i] > threshold
//     y[t] = sum over kept i of a[t, i] * u[t, i] * w_down_t[i, :],
//     u[t, i] = w_up[i]·x[t] + b_up[i] (gated), or 1
//   input_sparse_ffn(x (T, H), w_in_t (H, G), in_scale (H), in_threshold, b_in (G)?,
//                    w_out_t (I, O), h_scale (I), h_threshold, activation, gated) -> y (T, O)
//     a whole FFN of selection "input" in one call: g = sparse_input_linear(x, w_in_t,
//     in_scale, in_threshold) + b_in; h = act(g[:, :I]) * g[:, I:] (gated; G = 2I) or act(g);
//     y = sparse_input_linear(h, w_out_t, h_scale, h_threshold)
//   rows_linear(x (T, K), w (N, K)) -> y (T, N) = x · wᵀ
//     a dense projection in nn.Linear's layout (a tied LM head, whose weight is also the
//     embedding table), read in place: each output is a dot product with one contiguous row
//
// At a few tokens such a projection costs what reading its weights costs, so the work is laid
// out for the memory system: the selected rows (union over the tokens) are listed once, split
// into equal runs, one per thread, and each thread streams its rows whole, 8 at a time (8
// concurrent streams), into its own partial y, for every token that selected one of them; the
// partials are summed at the end (T x N floats each: nothing next to the weights). Splitting
// y's columns instead (each thread reading a segment of every row) reached only 50-70% of the
// rate: short strided segments defeat the hardware prefetcher. A row nobody selected is never
// read. A dropped entry contributes nothing: its coefficient is set to 0, never computed as
// x * 0 (an inf there must not become a NaN). The score is computed in float as PyTorch's
// `x.abs() * scale > threshold` does (threshold rounded to float32), so both select exactly
// the same entries.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kMaxTokens = 64;  // a token set is a uint64_t bit mask
// Selected rows read together, as concurrent streams: scattered rows of a few KiB read one
// at a time leave the memory system idle between them (at half the rows kept, 8 together ran
// 1.3-1.4x faster than 1; software prefetching of the next rows gained nothing).
constexpr int kGroup = 8;
// Least weight bytes per thread: below it a thread's start-up costs more than it saves.
constexpr int64_t kMinBytesPerTask = 32 << 10;

// y[k] += sum_g c[g] * r[g][k]: kGroup rows into one token's output. A plain loop on purpose:
// GCC vectorises it for whatever the target has, where 64-byte v16 stores without AVX-512
// went through the stack (3x slower than the memory they wait for).
inline void add_group(const float* const* r, const float* c, float* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    float s = 0.f;
    for (int g = 0; g < kGroup; ++g) s += c[g] * r[g][k];
    y[k] += s;
  }
}

typedef float v8 __attribute__((vector_size(32)));  // 8 accumulators fit AVX2's registers

inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// out[g] = dot(r[g], x) for g < kGroup: the rows read together, as concurrent streams.
inline void group_dots(const float* const* r, const float* __restrict x, int64_t n, float* out) {
  v8 acc[kGroup];
  for (int g = 0; g < kGroup; ++g) acc[g] = v8{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const v8 xv = load8(x + k);
    for (int g = 0; g < kGroup; ++g) acc[g] += load8(r[g] + k) * xv;
  }
  for (int g = 0; g < kGroup; ++g) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += acc[g][l];
    for (int64_t j = k; j < n; ++j) s += r[g][j] * x[j];
    out[g] = s;
  }
}

// The selected rows of a weight, ascending, and for each the T tokens' coefficients: 0 for a
// token that did not select it (set, not computed as x * 0).
struct Selection {
  std::vector<int64_t> rows;
  std::vector<float> coefs;  // (rows, T)
};

// Splits U selected rows of row_bytes each into equal runs, one per thread (fewer when there
// is little to read); body(u0, u1, acc) adds rows [u0, u1) into acc, a zeroed (T, N) buffer:
// y itself for the first run, a private partial for the others, summed into y at the end.
// The split depends only on U and the thread count, so results are reproducible.
template <class Body>
void over_row_runs(int64_t U, int64_t row_bytes, int64_t T, int64_t N, float* y,
                   const Body& body) {
  const int64_t by_bytes = U * row_bytes / kMinBytesPerTask;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_bytes));
  std::fill(y, y + T * N, 0.f);
  if (tasks == 1) {
    body(0, U, y);
    return;
  }
  std::vector<float> part((tasks - 1) * T * N, 0.f);
  at::parallel_for(0, tasks, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      body(U * p / tasks, U * (p + 1) / tasks, p == 0 ? y : part.data() + (p - 1) * T * N);
  });
  for (int64_t p = 1; p < tasks; ++p) {
    const float* src = part.data() + (p - 1) * T * N;
    for (int64_t k = 0; k < T * N; ++k) y[k] += src[k];
  }
}

// acc (T, N) += coefs[u, t] * W[rows[u], :] over the selected rows u in [u0, u1), kGroup rows
// at a time (the last group padded with `zero`, N floats of 0); a token that selected none of
// a group's rows skips it.
void add_rows(const float* W, int64_t N, const int64_t* rows, const float* coefs, int64_t T,
              int64_t u0, int64_t u1, const float* zero, float* acc) {
  const float* r[kGroup];
  float c[kGroup];
  for (int64_t u = u0; u < u1; u += kGroup) {
    for (int g = 0; g < kGroup; ++g) r[g] = u + g < u1 ? W + rows[u + g] * N : zero;
    for (int64_t t = 0; t < T; ++t) {
      bool any = false;
      for (int g = 0; g < kGroup; ++g) {
        c[g] = u + g < u1 ? coefs[(u + g) * T + t] : 0.f;
        any |= c[g] != 0.f;
      }
      if (any) add_group(r, c, acc + t * N, N);
    }
  }
}

// a[i * T + t] = act(g[t, i]); bit t of kept[i] set where |a| * coef[i] > thr; neurons
// [i0, i1). One instance per activation: no switch per element, and the cheap ones vectorise.
template <Act A>
void activate_and_test(const float* __restrict g, const float* __restrict coef, float thr,
                       int64_t F, int64_t T, int64_t i0, int64_t i1, float* __restrict a,
                       uint64_t* __restrict kept) {
  for (int64_t t = 0; t < T; ++t) {
    const float* gt = g + t * F;
    for (int64_t i = i0; i < i1; ++i) {
      const float v = activate(A, gt[i]);
      a[i * T + t] = v;
      kept[i] |= static_cast<uint64_t>(!(std::fabs(v) * coef[i] <= thr)) << t;
    }
  }
}

void activate_and_test(Act act, const float* g, const float* coef, float thr, int64_t F,
                       int64_t T, int64_t i0, int64_t i1, float* a, uint64_t* kept) {
  switch (act) {
    case Act::relu:
      return activate_and_test<Act::relu>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::gelu:
      return activate_and_test<Act::gelu>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::gelu_tanh:
      return activate_and_test<Act::gelu_tanh>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::silu:
      return activate_and_test<Act::silu>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::squared_relu:
      return activate_and_test<Act::squared_relu>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::quick_gelu:
      return activate_and_test<Act::quick_gelu>(g, coef, thr, F, T, i0, i1, a, kept);
    case Act::hardswish:
      return activate_and_test<Act::hardswish>(g, coef, thr, F, T, i0, i1, a, kept);
  }
}

void check_matrix(const Tensor& t, int64_t rows, int64_t cols, const char* op,
                  const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
                  t.dim() == 2 && (rows < 0 || t.size(0) == rows) &&
                  (cols < 0 || t.size(1) == cols),
              "moefy ", op, ": ", name, " must be a contiguous float32 CPU tensor of shape (",
              rows < 0 ? std::string("any") : std::to_string(rows), ", ",
              cols < 0 ? std::string("any") : std::to_string(cols), "), got ", t.scalar_type(),
              " of shape ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

void check_vector(const Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
                  t.dim() == 1 && t.size(0) == n,
              "moefy ", op, ": ", name, " must be a contiguous float32 CPU tensor of shape (",
              n, "), got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_tokens(int64_t T, const char* op) {
  TORCH_CHECK(T <= kMaxTokens, "moefy ", op, ": at most ", kMaxTokens,
              " tokens per call (a decode kernel), got ", T,
              "; larger batches take the PyTorch path");
}

// y (T, N) = sum over the channels j of x (T, K) with |x[t, j]| * scale[j] > thr of
// x[t, j] * W[j, :]; only the rows some token selected are read.
void sparse_rows(const float* xp, int64_t T, int64_t K, const float* W, int64_t N,
                 const float* sp, float thr, float* y) {
  Selection sel;
  std::vector<float> c(T);
  for (int64_t j = 0; j < K; ++j) {
    const float s = sp[j];
    bool any = false;
    for (int64_t t = 0; t < T; ++t) {
      const float v = xp[t * K + j];
      const bool keep = !(std::fabs(v) * s <= thr);  // a NaN score keeps its entry
      c[t] = keep ? v : 0.f;
      any |= keep;
    }
    if (!any) continue;
    sel.rows.push_back(j);
    sel.coefs.insert(sel.coefs.end(), c.begin(), c.end());
  }
  const std::vector<float> zero(N, 0.f);
  over_row_runs(static_cast<int64_t>(sel.rows.size()), N * 4, T, N, y,
                [&](int64_t u0, int64_t u1, float* acc) {
    add_rows(W, N, sel.rows.data(), sel.coefs.data(), T, u0, u1, zero.data(), acc);
  });
}

Tensor sparse_input_linear(const Tensor& x, const Tensor& wt, const Tensor& scale,
                           double threshold) {
  constexpr const char* op = "sparse_input_linear";
  check_matrix(x, -1, -1, op, "x (T, K)");
  const int64_t T = x.size(0), K = x.size(1);
  check_tokens(T, op);
  check_matrix(wt, K, -1, op, "wt (K, N), the transposed weight,");
  check_vector(scale, K, op, "scale (K)");
  const int64_t N = wt.size(1);
  Tensor y = at::empty({T, N}, x.options());
  // the threshold rounded to float32, as PyTorch compares float32 tensors
  sparse_rows(x.data_ptr<float>(), T, K, wt.data_ptr<float>(), N, scale.data_ptr<float>(),
              static_cast<float>(threshold), y.data_ptr<float>());
  return y;
}

template <Act A>
void gate_times_up(const float* __restrict g, int64_t T, int64_t I, bool gated,
                   float* __restrict h) {
  const int64_t G = gated ? 2 * I : I;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i)
      h[t * I + i] = activate(A, g[t * G + i]) * (gated ? g[t * G + I + i] : 1.f);
}

// h = act(g[:, :I]) * g[:, I:] (gated) or act(g), one instance per activation
void gate_times_up(Act act, const float* g, int64_t T, int64_t I, bool gated, float* h) {
  switch (act) {
    case Act::relu: return gate_times_up<Act::relu>(g, T, I, gated, h);
    case Act::gelu: return gate_times_up<Act::gelu>(g, T, I, gated, h);
    case Act::gelu_tanh: return gate_times_up<Act::gelu_tanh>(g, T, I, gated, h);
    case Act::silu: return gate_times_up<Act::silu>(g, T, I, gated, h);
    case Act::squared_relu: return gate_times_up<Act::squared_relu>(g, T, I, gated, h);
    case Act::quick_gelu: return gate_times_up<Act::quick_gelu>(g, T, I, gated, h);
    case Act::hardswish: return gate_times_up<Act::hardswish>(g, T, I, gated, h);
  }
}

// A whole input-sparse FFN in one call (selection "input"): the selected input channels' rows
// of [gate; up] (bias added), h = act(gate) * up, then the selected neurons' rows of down.
Tensor input_sparse_ffn(const Tensor& x, const Tensor& w_in_t, const Tensor& in_scale,
                        double in_threshold, const c10::optional<Tensor>& b_in,
                        const Tensor& w_out_t, const Tensor& h_scale, double h_threshold,
                        const std::string& activation, bool gated) {
  constexpr const char* op = "input_sparse_ffn";
  check_matrix(x, -1, -1, op, "x (T, H)");
  const int64_t T = x.size(0), H = x.size(1);
  check_tokens(T, op);
  check_matrix(w_in_t, H, -1, op, "w_in_t (H, G), the transposed [gate; up],");
  const int64_t G = w_in_t.size(1);
  TORCH_CHECK(!gated || G % 2 == 0, "moefy ", op, ": a gated FFN's w_in_t has an even number "
              "of columns ([gate; up]), got ", G);
  const int64_t I = gated ? G / 2 : G;
  check_vector(in_scale, H, op, "in_scale (H)");
  if (b_in.has_value()) check_vector(*b_in, G, op, "b_in (G)");
  check_matrix(w_out_t, I, -1, op, "w_out_t (I, O), the transposed down projection,");
  const int64_t O = w_out_t.size(1);
  check_vector(h_scale, I, op, "h_scale (I)");
  const Act act = parse_activation(activation);

  std::vector<float> g(T * G), h(T * I);
  sparse_rows(x.data_ptr<float>(), T, H, w_in_t.data_ptr<float>(), G,
              in_scale.data_ptr<float>(), static_cast<float>(in_threshold), g.data());
  if (b_in.has_value()) {
    const float* b = b_in->data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < G; ++k) g[t * G + k] += b[k];
  }
  gate_times_up(act, g.data(), T, I, gated, h.data());
  Tensor y = at::empty({T, O}, x.options());
  sparse_rows(h.data(), T, I, w_out_t.data_ptr<float>(), O, h_scale.data_ptr<float>(),
              static_cast<float>(h_threshold), y.data_ptr<float>());
  return y;
}

Tensor neuron_ffn(const Tensor& x, const Tensor& g, const c10::optional<Tensor>& w_up,
                  const c10::optional<Tensor>& b_up, const Tensor& w_down_t, const Tensor& coef,
                  double threshold, const std::string& activation) {
  constexpr const char* op = "neuron_ffn";
  check_matrix(x, -1, -1, op, "x (T, H)");
  const int64_t T = x.size(0), H = x.size(1);
  check_tokens(T, op);
  check_matrix(g, T, -1, op, "g (T, F)");
  const int64_t F = g.size(1);
  check_matrix(w_down_t, F, -1, op, "w_down_t (F, O), the transposed down projection,");
  const int64_t O = w_down_t.size(1);
  check_vector(coef, F, op, "coef (F)");
  if (w_up.has_value()) check_matrix(*w_up, F, H, op, "w_up (F, H)");
  if (b_up.has_value()) {
    TORCH_CHECK(w_up.has_value(), "moefy neuron_ffn: b_up needs w_up (it is the up "
                "projection's bias)");
    check_vector(*b_up, F, op, "b_up (F)");
  }
  const Act act = parse_activation(activation);
  const float thr = static_cast<float>(threshold);

  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* cp = coef.data_ptr<float>();
  const float* wu = w_up.has_value() ? w_up->data_ptr<float>() : nullptr;
  const float* bu = b_up.has_value() ? b_up->data_ptr<float>() : nullptr;
  // Phase 1, split over neurons: activation and keep test. a (F, T); kept (F): token masks.
  std::vector<float> a(F * T);
  std::vector<uint64_t> kept(F, 0);
  at::parallel_for(0, F, 1024, [&](int64_t i0, int64_t i1) {
    activate_and_test(act, gp, cp, thr, F, T, i0, i1, a.data(), kept.data());
  });
  // The kept neurons (union over tokens).
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < F; ++i)
    if (kept[i]) rows.push_back(i);
  // Phase 2, the kept neurons split into equal runs, kGroup at a time: u from their w_up rows
  // (read together), then their w_down_t rows into the run's partial y. Only kept neurons'
  // rows are read.
  Tensor y = at::empty({T, O}, x.options());
  const float* wd = w_down_t.data_ptr<float>();
  const std::vector<float> zero(std::max(O, H), 0.f);
  const float* zero_h = zero.data();
  const int64_t row_bytes = (O + (wu ? H : 0)) * 4;
  over_row_runs(static_cast<int64_t>(rows.size()), row_bytes, T, O, y.data_ptr<float>(),
                [&](int64_t u0, int64_t u1, float* acc) {
    float coefs[kGroup * kMaxTokens], u[kGroup];
    const float* up[kGroup];
    for (int64_t r0 = u0; r0 < u1; r0 += kGroup) {
      const int64_t n = std::min<int64_t>(kGroup, u1 - r0);
      for (int64_t r = 0; r < kGroup; ++r) up[r] = wu && r < n ? wu + rows[r0 + r] * H : zero_h;
      for (int64_t t = 0; t < T; ++t) {
        if (wu) group_dots(up, xp + t * H, H, u);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t i = rows[r0 + r];
          const float ut = wu ? u[r] + (bu ? bu[i] : 0.f) : 1.f;
          coefs[r * T + t] = (kept[i] >> t) & 1 ? a[i * T + t] * ut : 0.f;
        }
      }
      add_rows(wd, O, rows.data() + r0, coefs, T, 0, n, zero.data(), acc);
    }
  });
  return y;
}

Tensor rows_linear(const Tensor& x, const Tensor& w) {
  constexpr const char* op = "rows_linear";
  check_matrix(x, -1, -1, op, "x (T, K)");
  const int64_t T = x.size(0), K = x.size(1);
  check_tokens(T, op);
  check_matrix(w, -1, K, op, "w (N, K)");
  const int64_t N = w.size(0);
  Tensor y = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> zero(K, 0.f);
  // the rows in equal runs of whole groups, one per thread; each group of kGroup rows is read
  // once (concurrent streams) and dotted with every token while it is in L1
  const int64_t groups = (N + kGroup - 1) / kGroup;
  const int64_t by_bytes = std::max<int64_t>(1, N * K * 4 / kMinBytesPerTask);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_bytes));
  at::parallel_for(0, tasks, 1, [&](int64_t p0, int64_t p1) {
    const float* r[kGroup];
    float out[kGroup];
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t gi = groups * p / tasks; gi < groups * (p + 1) / tasks; ++gi) {
        const int64_t n0 = gi * kGroup, n = std::min<int64_t>(kGroup, N - n0);
        for (int g = 0; g < kGroup; ++g) r[g] = g < n ? W + (n0 + g) * K : zero.data();
        for (int64_t t = 0; t < T; ++t) {
          group_dots(r, xp + t * K, K, out);
          for (int64_t g = 0; g < n; ++g) yp[t * N + n0 + g] = out[g];
        }
      }
    }
  });
  return y;
}

// The selection of sparse_input_linear as one pass over x, for batches too large for it
// (prefill): xs[t, j] = x[t, j] where |x[t, j]| * scale[j] > threshold, else 0 (a NaN score
// keeps its entry). The caller multiplies xs by the weights with one GEMM.
at::Tensor mask_inputs(const at::Tensor& x, const at::Tensor& scale, double threshold) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "mask_inputs: x and scale must be float32");
  TORCH_CHECK(x.is_contiguous() && scale.is_contiguous() && x.dim() >= 1,
              "mask_inputs: x and scale must be contiguous, x at least 1-d");
  const int64_t K = scale.numel();
  TORCH_CHECK(x.size(-1) == K, "mask_inputs: x's last dimension (", x.size(-1),
              ") must equal scale's length (", K, ")");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = K ? x.numel() / K : 0;
  const float thr = static_cast<float>(threshold);  // as PyTorch compares float32 tensors
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * K;
      float* orow = op + r * K;
      for (int64_t j = 0; j < K; ++j) {
        const float v = xr[j];
        orow[j] = std::fabs(v) * sp[j] <= thr ? 0.f : v;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefy_cpu, m) {
  m.def("mask_inputs(Tensor x, Tensor scale, float threshold) -> Tensor");
  m.def("sparse_input_linear(Tensor x, Tensor wt, Tensor scale, float threshold) -> Tensor");
  m.def("rows_linear(Tensor x, Tensor w) -> Tensor");
  m.def(
      "input_sparse_ffn(Tensor x, Tensor w_in_t, Tensor in_scale, float in_threshold, "
      "Tensor? b_in, Tensor w_out_t, Tensor h_scale, float h_threshold, str activation, "
      "bool gated) -> Tensor");
  m.def(
      "neuron_ffn(Tensor x, Tensor g, Tensor? w_up, Tensor? b_up, Tensor w_down_t, "
      "Tensor coef, float threshold, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefy_cpu, CPU, m) {
  m.impl("mask_inputs", mask_inputs);
  m.impl("sparse_input_linear", sparse_input_linear);
  m.impl("neuron_ffn", neuron_ffn);
  m.impl("rows_linear", rows_linear);
  m.impl("input_sparse_ffn", input_sparse_ffn);
}

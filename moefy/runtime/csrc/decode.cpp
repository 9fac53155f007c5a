// The routed experts for decode-sized batches (a few tokens, float32, CPU), as one call.
//
// At a handful of tokens an expert FFN costs what reading its weights costs. This kernel reads
// each touched expert's weights straight from the stacked tensors, once for all tokens — no
// copy of the weights into a batch (which would double the memory traffic) and no operator
// call per expert. Every touched expert runs on every token; where a token did not choose it,
// its hidden row is set to 0 (not multiplied by 0: an inf there must not become a NaN).
//
//   decode_ffn(x (T, H), weights (T, k), indices (T, k),
//              w_in (E, I, H), w_gate (E, I, H)?, b_in (E, I)?, b_gate (E, I)?,
//              w_out (E, O, I), b_out (E, O)?, activation) -> y (T, O)
//   (O, the output width, is read from w_out: H, or another width for a block that changes it)
//   y[t] = sum_j weights[t, j] * expert(indices[t, j])(x[t])

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

constexpr int64_t kMaxTokens = 64;

// out[t] = dot(row, X + t * ldx) for t < TT: the row is loaded once per 16 columns and
// multiplied into TT register accumulators; with few tokens, R independent accumulators per
// token hide the FMA latency.
template <int TT>
inline void multi_dot(const float* __restrict row, const float* __restrict X, int64_t ldx,
                      int64_t n, float* __restrict out) {
  constexpr int R = TT >= 4 ? 1 : 4 / TT;
  v16 acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = v16{};
  int64_t k = 0;
  for (; k + 16 * R <= n; k += 16 * R) {
    for (int r = 0; r < R; ++r) {
      const v16 w = load16(row + k + 16 * r);
      for (int t = 0; t < TT; ++t) acc[t][r] += w * load16(X + t * ldx + k + 16 * r);
    }
  }
  for (; k + 16 <= n; k += 16) {
    const v16 w = load16(row + k);
    for (int t = 0; t < TT; ++t) acc[t][0] += w * load16(X + t * ldx + k);
  }
  for (int t = 0; t < TT; ++t) {
    for (int r = 1; r < R; ++r) acc[t][0] += acc[t][r];
    float s = hsum(acc[t][0]);
    for (int64_t j = k; j < n; ++j) s += row[j] * X[t * ldx + j];
    out[t] = s;
  }
}

// out[t] = dot(row, X + t * ldx) for all T tokens, in tiles of 8, 4, 2, 1.
inline void dots(const float* row, const float* X, int64_t ldx, int64_t n, int64_t T,
                 float* out) {
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) multi_dot<8>(row, X + t * ldx, ldx, n, out + t);
  if (t + 4 <= T) {
    multi_dot<4>(row, X + t * ldx, ldx, n, out + t);
    t += 4;
  }
  if (t + 2 <= T) {
    multi_dot<2>(row, X + t * ldx, ldx, n, out + t);
    t += 2;
  }
  if (t < T) multi_dot<1>(row, X + t * ldx, ldx, n, out + t);
}

void check_weight(const at::Tensor& w, int64_t E, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 3 &&
                  w.size(0) == E && w.size(1) == rows && w.size(2) == cols,
              "moefy decode kernel: ", name, " must be contiguous float32 (", E, ", ", rows,
              ", ", cols, "), got ", w.sizes());
}

const float* bias_ptr(const c10::optional<at::Tensor>& b, int64_t E, int64_t n,
                      const char* name) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->dim() == 2 &&
                  b->size(0) == E && b->size(1) == n,
              "moefy decode kernel: ", name, " must be contiguous float32 (", E, ", ", n, ")");
  return b->data_ptr<float>();
}

at::Tensor decode_ffn(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& indices,
                      const at::Tensor& w_in, const c10::optional<at::Tensor>& w_gate,
                      const c10::optional<at::Tensor>& b_in,
                      const c10::optional<at::Tensor>& b_gate, const at::Tensor& w_out,
                      const c10::optional<at::Tensor>& b_out, const std::string& activation) {
  const int64_t T = x.size(0), H = x.size(1), k = indices.size(1);
  const int64_t E = w_in.size(0), I = w_in.size(1), O = w_out.size(1);
  TORCH_CHECK(T <= kMaxTokens, "moefy decode kernel: at most ", kMaxTokens, " tokens, got ", T);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "moefy decode kernel: x must be contiguous float32 (T, H)");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.dim() == 2 && indices.size(0) == T,
              "moefy decode kernel: indices must be contiguous int64 (T, k)");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.sizes() == indices.sizes(),
              "moefy decode kernel: weights must be contiguous float32 like indices");
  check_weight(w_in, E, I, H, "w_in");
  check_weight(w_out, E, O, I, "w_out");
  if (w_gate.has_value()) check_weight(*w_gate, E, I, H, "w_gate");
  const float* bi = bias_ptr(b_in, E, I, "b_in");
  const float* bg = bias_ptr(b_gate, E, I, "b_gate");
  const float* bo = bias_ptr(b_out, E, O, "b_out");
  const Act act = parse_activation(activation);

  // Routing as a dense (E, T) table; the touched experts in ascending order.
  const float* wp = weights.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  std::vector<float> route(E * T, 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ip[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, "moefy decode kernel: expert index ", e, " out of range");
      route[e * T + t] += wp[t * k + j];
    }
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < T; ++t)
      if (route[e * T + t] != 0.f) {
        experts.push_back(e);
        break;
      }
  const int64_t U = static_cast<int64_t>(experts.size());

  const float* xp = x.data_ptr<float>();
  const float* wi = w_in.data_ptr<float>();
  const float* wg = w_gate.has_value() ? w_gate->data_ptr<float>() : nullptr;
  // Hidden activations, already scaled by the routing weight: (U, T, I).
  std::vector<float> h(U * T * I);
  at::parallel_for(0, U * I, 16, [&](int64_t begin, int64_t end) {
    float a[kMaxTokens], g[kMaxTokens];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t u = r / I, i = r % I, e = experts[u];
      dots(wi + (e * I + i) * H, xp, H, H, T, a);
      if (wg) dots(wg + (e * I + i) * H, xp, H, H, T, g);
      for (int64_t t = 0; t < T; ++t) {
        const float av = a[t] + (bi ? bi[e * I + i] : 0.f);
        float v;
        if (wg) {
          v = activate(act, g[t] + (bg ? bg[e * I + i] : 0.f)) * av;
        } else {
          v = activate(act, av);
        }
        const float r = route[e * T + t];
        h[(u * T + t) * I + i] = r != 0.f ? v * r : 0.f;
      }
    }
  });

  at::Tensor y = at::empty({T, O}, x.options());
  float* yp = y.data_ptr<float>();
  const float* wo = w_out.data_ptr<float>();
  // One task = a range of output features; it owns y[:, range]. Within it, blocks of kBlock
  // features: for each expert the block's rows of w_out are contiguous, so each expert is one
  // memory stream rather than U streams interleaved row by row.
  constexpr int64_t kBlock = 32;
  at::parallel_for(0, O, kBlock, [&](int64_t begin, int64_t end) {
    float acc[kBlock * kMaxTokens], part[kMaxTokens];
    for (int64_t o0 = begin; o0 < end; o0 += kBlock) {
      const int64_t o1 = std::min(end, o0 + kBlock);
      for (int64_t j = 0; j < (o1 - o0) * T; ++j) acc[j] = 0.f;
      for (int64_t u = 0; u < U; ++u) {
        const int64_t e = experts[u];
        for (int64_t o = o0; o < o1; ++o) {
          dots(wo + (e * O + o) * I, h.data() + u * T * I, I, I, T, part);
          float* a = acc + (o - o0) * T;
          for (int64_t t = 0; t < T; ++t)
            a[t] += part[t] + (bo ? route[e * T + t] * bo[e * O + o] : 0.f);
        }
      }
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t t = 0; t < T; ++t) yp[t * O + o] = acc[(o - o0) * T + t];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(moefy_cpu, m) {
  m.def(
      "decode_ffn(Tensor x, Tensor weights, Tensor indices, Tensor w_in, Tensor? w_gate, "
      "Tensor? b_in, Tensor? b_gate, Tensor w_out, Tensor? b_out, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefy_cpu, CPU, m) { m.impl("decode_ffn", decode_ffn); }

// PEER's product-key search for float32 CPU scores, one call for all (token, head) rows.
//
//   peer_search(s_a (R, n1), s_b (R, n2), k) -> (a (R, k), b (R, k))   int64 positions
//   peer_key_grad(rows (R, d), pos (R, k), g (R, k), n) -> (n, d)       its sparse backward
//
// Per row: the top-k' (k' = min(k, n)) of each half's sub-key scores, then the top-k of the
// k'·k' sums s_a[a] + s_b[b], in descending order of the sum. The caller forms the expert id
// a·n2 + b and takes the scores by gathering (so they stay differentiable).
//
// torch.topk twice, a broadcast add, topk again and three gathers cost several passes over
// memory and kernel launches per block; here each row is one pass kept in registers / L1:
// a selection that compares each score with the current k-th best (almost always a
// rejection), then the k'·k' sums visited in sorted order with early exits (both lists are
// descending, so once a_i + b_j falls below the k-th best, the rest of that row of sums does
// too, and once a_i + b_0 does, every later i does).
//
// NaN scores (a NaN token's) never enter a selection after it is full; such a row returns the
// first positions it saw, and the caller's gathered scores are NaN: the token's output is NaN.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // floats in a v16

// Keeps the k largest values seen (descending) and their positions.
struct TopK {
  float* val;
  int64_t* pos;
  int64_t k;
  int64_t size = 0;

  inline float threshold() const {
    return size < k ? -std::numeric_limits<float>::infinity() : val[k - 1];
  }

  inline void push(float v, int64_t p) {
    int64_t i = size < k ? size++ : k - 1;
    while (i > 0 && val[i - 1] < v) {
      val[i] = val[i - 1];
      pos[i] = pos[i - 1];
      --i;
    }
    val[i] = v;
    pos[i] = p;
  }
};

// The k largest of s[0..n), for k <= 16 and n >= 256: a bound first, then only the scores
// that reach it. Lane l's maximum over the 16-float vectors of the row is the maximum of the
// subset {s[l], s[16 + l], s[32 + l], ...}; the smallest of the 16 lane maxima is a lower bound
// of the 16th (so of the k-th) largest score, found without a branch. The scores that reach it
// (a few percent of a row) are appended branch-free to a buffer, and only those are ranked.
// Anything else (short rows, k > 16, a NaN bound): a plain insertion scan.
inline void select(const float* s, int64_t n, TopK& top, float* buf_v, int64_t* buf_i) {
  const int64_t vecs = n / kLanes;
  if (top.k <= kLanes && vecs >= 2 * kLanes) {
    v16 m = load16(s);
    for (int64_t j = 1; j < vecs; ++j) {
      const v16 v = load16(s + j * kLanes);
      m = v > m ? v : m;
    }
    float bound = m[0];
    for (int64_t l = 1; l < kLanes; ++l) bound = m[l] < bound ? m[l] : bound;
    if (bound == bound) {  // not NaN (a NaN score would make the lane maxima unreliable)
      int64_t count = 0;
      for (int64_t i = 0; i < n; ++i) {
        buf_v[count] = s[i];
        buf_i[count] = i;
        count += s[i] >= bound;
      }
      if (count >= top.k) {
        for (int64_t c = 0; c < count; ++c) {
          if (top.size < top.k || buf_v[c] > top.threshold()) top.push(buf_v[c], buf_i[c]);
        }
        return;
      }
    }
  }
  int64_t i = 0;
  for (; i < n && top.size < top.k; ++i) top.push(s[i], i);
  float thr = top.threshold();
  for (; i < n; ++i) {
    if (s[i] > thr) {
      top.push(s[i], i);
      thr = top.threshold();
    }
  }
}

std::tuple<at::Tensor, at::Tensor> peer_search(const at::Tensor& s_a, const at::Tensor& s_b,
                                               int64_t k) {
  TORCH_CHECK(s_a.dim() == 2 && s_b.dim() == 2 && s_a.size(0) == s_b.size(0),
              "peer_search: s_a (R, n1) and s_b (R, n2) expected");
  TORCH_CHECK(s_a.scalar_type() == at::kFloat && s_b.scalar_type() == at::kFloat,
              "peer_search: float32 scores expected");
  TORCH_CHECK(s_a.is_contiguous() && s_b.is_contiguous(), "peer_search: contiguous expected");
  const int64_t rows = s_a.size(0), n1 = s_a.size(1), n2 = s_b.size(1);
  const int64_t ka = std::min(k, n1), kb = std::min(k, n2);
  TORCH_CHECK(k >= 1 && k <= ka * kb, "peer_search: k must be in [1, n1*n2]");
  auto opts = s_a.options().dtype(at::kLong);
  at::Tensor out_a = at::empty({rows, k}, opts), out_b = at::empty({rows, k}, opts);
  const float* pa = s_a.data_ptr<float>();
  const float* pb = s_b.data_ptr<float>();
  int64_t* oa = out_a.data_ptr<int64_t>();
  int64_t* ob = out_b.data_ptr<int64_t>();

  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> va(ka), vb(kb), vc(k), buf_v(std::max(n1, n2) + 1);
    std::vector<int64_t> ia(ka), ib(kb), ic(k), buf_i(std::max(n1, n2) + 1);
    for (int64_t r = begin; r < end; ++r) {
      TopK ta{va.data(), ia.data(), ka}, tb{vb.data(), ib.data(), kb};
      select(pa + r * n1, n1, ta, buf_v.data(), buf_i.data());
      select(pb + r * n2, n2, tb, buf_v.data(), buf_i.data());
      TopK tc{vc.data(), ic.data(), k};  // position i·kb + j in the candidate grid
      for (int64_t i = 0; i < ka; ++i) {
        if (tc.size == k && !(va[i] + vb[0] > tc.threshold())) break;
        for (int64_t j = 0; j < kb; ++j) {
          const float v = va[i] + vb[j];
          if (tc.size == k && !(v > tc.threshold())) break;
          tc.push(v, i * kb + j);
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        oa[r * k + j] = ia[ic[j] / kb];
        ob[r * k + j] = ib[ic[j] % kb];
      }
    }
  });
  return {out_a, out_b};
}

// The gradient of one sub-key table: out[i] = sum over the (row r, slot j) pairs with
// pos[r, j] == i of g[r, j] * rows[r]. The pairs are counting-sorted by sub-key (n is small),
// then each sub-key's sum is made by one task: no atomics, no (R·k, d) temporary. A pair of
// gradient exactly 0 adds nothing (it is skipped, so an inf in its row cannot make a NaN).
at::Tensor peer_key_grad(const at::Tensor& rows, const at::Tensor& pos, const at::Tensor& g,
                         int64_t n) {
  TORCH_CHECK(rows.dim() == 2 && pos.dim() == 2 && g.sizes() == pos.sizes() &&
                  pos.size(0) == rows.size(0),
              "peer_key_grad: rows (R, d), pos (R, k), g (R, k) expected");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat &&
                  pos.scalar_type() == at::kLong,
              "peer_key_grad: float32 rows and g, int64 pos expected");
  TORCH_CHECK(rows.is_contiguous() && pos.is_contiguous() && g.is_contiguous(),
              "peer_key_grad: contiguous inputs expected");
  const int64_t k = pos.size(1), d = rows.size(1), pairs = pos.numel();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* pg = g.data_ptr<float>();
  const float* pr = rows.data_ptr<float>();
  std::vector<int64_t> start(n + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(pp[p] >= 0 && pp[p] < n, "peer_key_grad: position out of range");
    ++start[pp[p] + 1];
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[next[pp[p]]++] = p;
  }
  at::Tensor out = at::zeros({n, d}, rows.options());
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* acc = po + i * d;
      for (int64_t q = start[i]; q < start[i + 1]; ++q) {
        const int64_t p = order[q];
        const float w = pg[p];
        if (w == 0.f) continue;
        const float* row = pr + (p / k) * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += w * row[c];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moefy_cpu, m) {
  m.def("peer_search(Tensor s_a, Tensor s_b, int k) -> (Tensor, Tensor)");
  m.def("peer_key_grad(Tensor rows, Tensor pos, Tensor g, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefy_cpu, CPU, m) {
  m.impl("peer_search", peer_search);
  m.impl("peer_key_grad", peer_key_grad);
}

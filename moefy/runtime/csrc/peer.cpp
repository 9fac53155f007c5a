// PEER's single-neuron experts on CPU, float32: forward and backward without (T, S, H) copies.
//
//   peer_forward(x (T, H), ids (T, S), weights (T, S), down (N, H), up (N, H), down_bias (N)?,
//                gate (N, H)?, activation) -> (y (T, H), pre (T, S), gpre (T, S) or (0))
//   pre = down[i]·x_t + down_bias[i];  h = act(pre), or gated act(gate[i]·x_t) * pre
//   y_t = sum_s weights[t, s] * h * up[i]
//
// A retrieved expert is two (three) rows of 1 KiB at a random place in a table far larger
// than the caches, so the forward is a gather bound by memory latency and bandwidth: each
// token (one task owns one token's output, no atomics) reads each of its rows once, in blocks
// of 8 slots whose rows are read interleaved (8 independent miss streams instead of one row
// at a time; 2.5x faster than slot by slot), the next block's rows prefetched meanwhile. A
// slot with weight exactly 0 is skipped entirely (its row may hold inf; 0 * inf must not
// become NaN).
//
// The backward gives grad_x and grad_weights per token (as the forward, reading the rows
// again). Table gradients are accumulated without atomics: the live (token, slot) pairs are
// radix-sorted by expert id, and each unique id's rows are summed serially by one task. They
// come back compact, (U, H) values for the U unique ids; the caller makes them sparse or dense.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "common.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// Slots processed together: their rows are read interleaved (kBlock independent streams keep
// many cache misses in flight where one row at a time would wait on each), and the next
// block's rows are prefetched while this one computes.
constexpr int kBlock = 8;
// Pairs ahead whose token rows the table-gradient loop prefetches.
constexpr int64_t kAhead = 4;

inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// y = c * x
inline void scale(float c, const float* __restrict x, float* __restrict y, int64_t n) {
  const v16 cv = v16{} + c;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) store16(y + k, cv * load16(x + k));
  for (; k < n; ++k) y[k] = c * x[k];
}

// y += c * x
inline void axpy(float c, const float* __restrict x, float* __restrict y, int64_t n) {
  const v16 cv = v16{} + c;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) store16(y + k, load16(y + k) + cv * load16(x + k));
  for (; k < n; ++k) y[k] += c * x[k];
}

inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t k = 0; k < n; k += 16) __builtin_prefetch(row + k, 0, 3);
}

// out[b] = dot(rows[b], x) for b < kBlock.
inline void multi_dot(const float* const* rows, const float* __restrict x, int64_t n,
                      float* out) {
  v16 acc[kBlock];
  for (int b = 0; b < kBlock; ++b) acc[b] = v16{};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const v16 xv = load16(x + k);
    for (int b = 0; b < kBlock; ++b) acc[b] += load16(rows[b] + k) * xv;
  }
  for (int b = 0; b < kBlock; ++b) {
    float s = hsum(acc[b]);
    for (int64_t j = k; j < n; ++j) s += rows[b][j] * x[j];
    out[b] = s;
  }
}

// y += sum_b c[b] * rows[b]: y is loaded and stored once per block, not once per row.
inline void multi_axpy(const float* c, const float* const* rows, float* __restrict y,
                       int64_t n) {
  v16 cv[kBlock];
  for (int b = 0; b < kBlock; ++b) cv[b] = v16{} + c[b];
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    v16 even = load16(y + k), odd = v16{};  // two chains halve the FMA latency
    for (int b = 0; b < kBlock; b += 2) {
      even += cv[b] * load16(rows[b] + k);
      odd += cv[b + 1] * load16(rows[b + 1] + k);
    }
    store16(y + k, even + odd);
  }
  for (; k < n; ++k)
    for (int b = 0; b < kBlock; ++b) y[k] += c[b] * rows[b][k];
}

// dst = src for an output row written once and not read again soon: non-temporal stores skip
// reading the destination lines into the cache first (a third of the memory traffic).
inline void stream_row(const float* __restrict src, float* __restrict dst, int64_t n) {
#ifdef __AVX512F__
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
    for (; k < n; ++k) dst[k] = src[k];
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

// Ask for transparent huge pages on a large tensor's memory; true when the hint was taken.
// Random 1 KiB rows of a GiB table miss the TLB on almost every read with 4 KiB pages. The
// table gradients are fresh memory each call (hundreds of MiB at N = 2^20): faulting them in
// 4 KiB pages cost more than computing them (188 ms against 34 ms for 475 MB). Only a hint:
// where the kernel refuses it the pages stay small and nothing else changes; pages already
// touched are only merged later, in the background, so advise before the first write.
bool advise_huge_pages(const Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kPage = 4096;
  if (!t.is_cpu() || t.nbytes() < (size_t(4) << 20)) return false;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kPage - 1) / kPage * kPage;
  const uintptr_t last = (begin + t.nbytes()) / kPage * kPage;
  return last > first &&
         madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  return false;
#endif
}

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// d activate / dv, matching PyTorch's backward formulas (relu and hardswish boundaries too).
inline float activate_grad(Act act, float v) {
  switch (act) {
    case Act::relu: return v > 0.f ? 1.f : 0.f;
    case Act::gelu: {
      const float cdf = 0.5f * (1.f + std::erf(v * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * std::exp(-0.5f * v * v);
      return cdf + v * pdf;
    }
    case Act::gelu_tanh: {
      const float t = std::tanh(kGeluTanhC * (v + 0.044715f * v * v * v));
      const float inner_grad = kGeluTanhC * (1.f + 3.f * 0.044715f * v * v);
      return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * inner_grad;
    }
    case Act::silu: {
      const float s = sigmoid(v);
      return s * (1.f + v * (1.f - s));
    }
    case Act::squared_relu: return v > 0.f ? 2.f * v : 0.f;
    case Act::quick_gelu: {
      const float s = sigmoid(1.702f * v);
      return s + 1.702f * v * s * (1.f - s);
    }
    case Act::hardswish:
      if (v < -3.f) return 0.f;
      if (v <= 3.f) return v / 3.f + 0.5f;
      return 1.f;
  }
  return 1.f;
}

void check_2d(const Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols,
              const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == cols,
              "moefy peer kernel: ", name, " must be contiguous ", c10::toString(dtype), " (",
              rows, ", ", cols, "), got ", t.scalar_type(), " ", t.sizes());
}

struct Problem {
  int64_t T, S, H, N;
  const float* x;
  const int64_t* ids;
  const float* w;
  const float* down;
  const float* up;
  const float* bias;  // nullptr when absent
  const float* gate;  // nullptr when absent
  Act act;
};

Problem check_problem(const Tensor& x, const Tensor& ids, const Tensor& weights,
                      const Tensor& down, const Tensor& up,
                      const c10::optional<Tensor>& down_bias, const c10::optional<Tensor>& gate,
                      const std::string& activation) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && down.dim() == 2,
              "moefy peer kernel: x, ids and tables must be 2-D");
  Problem p{x.size(0), ids.size(1), x.size(1), down.size(0)};
  check_2d(x, at::kFloat, p.T, p.H, "x");
  check_2d(ids, at::kLong, p.T, p.S, "ids");
  check_2d(weights, at::kFloat, p.T, p.S, "weights");
  check_2d(down, at::kFloat, p.N, p.H, "down");
  check_2d(up, at::kFloat, p.N, p.H, "up");
  p.x = x.data_ptr<float>();
  p.ids = ids.data_ptr<int64_t>();
  p.w = weights.data_ptr<float>();
  p.down = down.data_ptr<float>();
  p.up = up.data_ptr<float>();
  p.bias = nullptr;
  p.gate = nullptr;
  if (down_bias.has_value()) {
    TORCH_CHECK(down_bias->scalar_type() == at::kFloat && down_bias->is_contiguous() &&
                    down_bias->dim() == 1 && down_bias->size(0) == p.N,
                "moefy peer kernel: down_bias must be contiguous float32 (", p.N, ")");
    p.bias = down_bias->data_ptr<float>();
  }
  if (gate.has_value()) {
    check_2d(*gate, at::kFloat, p.N, p.H, "gate");
    p.gate = gate->data_ptr<float>();
  }
  p.act = parse_activation(activation);
  return p;
}

inline int64_t checked_id(const Problem& p, int64_t q) {
  const int64_t id = p.ids[q];
  TORCH_CHECK(id >= 0 && id < p.N, "moefy peer kernel: expert id ", id, " out of range [0, ",
              p.N, ")");
  return id;
}

// The live slots (weight != 0) of tokens [begin, end), in order, and where each token's start.
struct LiveSlots {
  std::vector<int64_t> q;
  std::vector<int64_t> start;  // token t's slots are q[start[t - begin] .. start[t - begin + 1])
};

LiveSlots live_slots(const Problem& p, int64_t begin, int64_t end) {
  LiveSlots live;
  live.q.reserve((end - begin) * p.S);
  live.start.reserve(end - begin + 1);
  for (int64_t t = begin; t < end; ++t) {
    live.start.push_back(static_cast<int64_t>(live.q.size()));
    for (int64_t q = t * p.S; q < (t + 1) * p.S; ++q)
      if (p.w[q] != 0.f) live.q.push_back(q);  // never computed: its rows may hold inf
  }
  live.start.push_back(static_cast<int64_t>(live.q.size()));
  return live;
}

// Prefetch, from up to three tables, the rows of the live slots q[j0 .. j0 + kBlock).
inline void prefetch_block(const Problem& p, const std::vector<int64_t>& q, int64_t j0,
                           const float* a, const float* b, const float* c) {
  const int64_t j1 = std::min<int64_t>(j0 + kBlock, static_cast<int64_t>(q.size()));
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t id = p.ids[q[j]];
    if (id < 0 || id >= p.N) continue;  // reported when the slot itself is reached
    if (a) prefetch_row(a + id * p.H, p.H);
    if (b) prefetch_row(b + id * p.H, p.H);
    if (c) prefetch_row(c + id * p.H, p.H);
  }
}

// Row pointers of the block's slots in `table`; past `count`, the zero row (its coefficient
// is 0 too, so padding adds exact zeros).
inline void block_rows(const Problem& p, const int64_t* id, int count, const float* table,
                       const float* zero_row, const float** rows) {
  for (int b = 0; b < kBlock; ++b) rows[b] = b < count ? table + id[b] * p.H : zero_row;
}

std::tuple<Tensor, Tensor, Tensor> peer_forward(
    const Tensor& x, const Tensor& ids, const Tensor& weights, const Tensor& down,
    const Tensor& up, const c10::optional<Tensor>& down_bias, const c10::optional<Tensor>& gate,
    const std::string& activation) {
  const Problem p = check_problem(x, ids, weights, down, up, down_bias, gate, activation);
  const int64_t T = p.T, S = p.S, H = p.H;
  Tensor y = at::empty({T, H}, x.options());
  Tensor pre = at::empty({T, S}, x.options());
  Tensor gpre = at::empty({p.gate ? T : 0, S}, x.options());
  float* yp = y.data_ptr<float>();
  float* prep = pre.data_ptr<float>();
  float* gprep = gpre.data_ptr<float>();
  std::fill(prep, prep + T * S, 0.f);  // weight-0 slots keep 0
  if (p.gate) std::fill(gprep, gprep + T * S, 0.f);
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    const LiveSlots live = live_slots(p, begin, end);
    std::vector<float> acc(H), zero_row(H, 0.f);
    prefetch_block(p, live.q, 0, p.down, p.up, p.gate);
    for (int64_t t = begin; t < end; ++t) {
      const float* xt = p.x + t * H;
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t j_end = live.start[t - begin + 1];
      for (int64_t j0 = live.start[t - begin]; j0 < j_end; j0 += kBlock) {
        const int count = static_cast<int>(std::min<int64_t>(kBlock, j_end - j0));
        prefetch_block(p, live.q, j0 + count, p.down, p.up, p.gate);
        int64_t id[kBlock];
        for (int b = 0; b < count; ++b) id[b] = checked_id(p, live.q[j0 + b]);
        const float *down_rows[kBlock], *up_rows[kBlock], *gate_rows[kBlock];
        float d[kBlock], g[kBlock], c[kBlock];
        block_rows(p, id, count, p.down, zero_row.data(), down_rows);
        block_rows(p, id, count, p.up, zero_row.data(), up_rows);
        multi_dot(down_rows, xt, H, d);
        if (p.gate) {
          block_rows(p, id, count, p.gate, zero_row.data(), gate_rows);
          multi_dot(gate_rows, xt, H, g);
        }
        for (int b = 0; b < kBlock; ++b) {
          if (b >= count) {
            c[b] = 0.f;
            continue;
          }
          const int64_t q = live.q[j0 + b];
          d[b] += p.bias ? p.bias[id[b]] : 0.f;
          prep[q] = d[b];
          float h;
          if (p.gate) {
            gprep[q] = g[b];
            h = activate(p.act, g[b]) * d[b];
          } else {
            h = activate(p.act, d[b]);
          }
          c[b] = p.w[q] * h;
        }
        multi_axpy(c, up_rows, acc.data(), H);
      }
      std::copy(acc.begin(), acc.end(), yp + t * H);
    }
  });
  return {y, pre, gpre};
}

// The live pairs (weight != 0) sorted by expert id, stably, as (id << 32 | pair) keys: an LSD
// radix sort on the id bits, at most 11 bits a pass (two passes for N = 2^20).
std::vector<uint64_t> sort_live_pairs(const Problem& p) {
  const int64_t P = p.T * p.S;
  TORCH_CHECK(P < (int64_t(1) << 32) && p.N < (int64_t(1) << 32),
              "moefy peer kernel: at most 2^32 (token, slot) pairs and experts");
  std::vector<uint64_t> keys;
  keys.reserve(P);
  for (int64_t q = 0; q < P; ++q)
    if (p.w[q] != 0.f) keys.push_back(uint64_t(checked_id(p, q)) << 32 | uint64_t(q));
  const int64_t L = static_cast<int64_t>(keys.size());
  int bits = 0;
  while (bits < 32 && (p.N - 1) >> bits > 0) ++bits;
  const int passes = (bits + 10) / 11;
  if (passes == 0) return keys;
  const int width = (bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t(1) << width) - 1;
  std::vector<uint64_t> tmp(L);
  std::vector<int64_t> count(int64_t(1) << width);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = 32 + pass * width;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t j = 0; j < L; ++j) ++count[(keys[j] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t n = c;
      c = sum;
      sum += n;
    }
    for (int64_t j = 0; j < L; ++j) tmp[count[(keys[j] >> shift) & mask]++] = keys[j];
    keys.swap(tmp);
  }
  return keys;
}

// Returns (grad_x, grad_weights, unique_ids, grad_down, grad_up, grad_gate, grad_bias): the
// table gradients as rows for unique_ids; a gradient not asked for is an empty tensor.
std::vector<Tensor> peer_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& ids, const Tensor& weights,
    const Tensor& down, const Tensor& up, const c10::optional<Tensor>& down_bias,
    const c10::optional<Tensor>& gate, const Tensor& pre, const Tensor& gpre,
    const std::string& activation, bool need_x, bool need_w, bool need_down, bool need_up,
    bool need_gate, bool need_bias) {
  const Problem p = check_problem(x, ids, weights, down, up, down_bias, gate, activation);
  const int64_t T = p.T, S = p.S, H = p.H, P = T * S;
  check_2d(grad_y, at::kFloat, T, H, "grad_y");
  check_2d(pre, at::kFloat, T, S, "pre");
  if (p.gate) check_2d(gpre, at::kFloat, T, S, "gpre");
  need_gate = need_gate && p.gate;
  need_bias = need_bias && p.bias;
  const auto opts = x.options();
  const auto empty = [&] { return at::empty({0}, opts); };
  const float* gyp = grad_y.data_ptr<float>();
  const float* prep = pre.data_ptr<float>();
  const float* gprep = p.gate ? gpre.data_ptr<float>() : nullptr;

  // Stage 1, one task per token range: grad_x, grad_weights and the per-pair scalars that
  // the table gradients scale x_t and grad_y_t by.
  const bool need_gu = need_x || need_w || need_down || need_gate || need_bias;
  Tensor grad_x = need_x ? at::empty({T, H}, opts) : empty();
  Tensor grad_w = need_w ? at::empty({T, S}, opts) : empty();
  std::vector<float> c_up(need_up ? P : 0), c_down(need_down || need_bias ? P : 0),
      c_gate(need_gate ? P : 0);
  float* gxp = need_x ? grad_x.data_ptr<float>() : nullptr;
  float* gwp = need_w ? grad_w.data_ptr<float>() : nullptr;
  if (need_gu || need_up) {
    const float* pf_up = need_gu ? p.up : nullptr;
    const float* pf_down = need_x ? p.down : nullptr;
    const float* pf_gate = need_x ? p.gate : nullptr;
    if (gwp) std::fill(gwp, gwp + P, 0.f);  // weight-0 slots: no gradient
    at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
      const LiveSlots live = live_slots(p, begin, end);
      std::vector<float> acc(H), zero_row(H, 0.f);
      prefetch_block(p, live.q, 0, pf_up, pf_down, pf_gate);
      for (int64_t t = begin; t < end; ++t) {
        const float* gyt = gyp + t * H;
        std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t j_end = live.start[t - begin + 1];
        for (int64_t j0 = live.start[t - begin]; j0 < j_end; j0 += kBlock) {
          const int count = static_cast<int>(std::min<int64_t>(kBlock, j_end - j0));
          prefetch_block(p, live.q, j0 + count, pf_up, pf_down, pf_gate);
          int64_t id[kBlock];
          for (int b = 0; b < count; ++b) id[b] = checked_id(p, live.q[j0 + b]);
          const float* rows[kBlock];
          float gu[kBlock], gd[kBlock], gg[kBlock];
          if (need_gu) {  // gu = dL/d(w h) = grad_y_t · up[i]
            block_rows(p, id, count, p.up, zero_row.data(), rows);
            multi_dot(rows, gyt, H, gu);
          }
          for (int b = 0; b < kBlock; ++b) {
            gd[b] = gg[b] = 0.f;
            if (b >= count) continue;
            const int64_t q = live.q[j0 + b];
            const float w = p.w[q], d = prep[q];
            const float a = p.gate ? activate(p.act, gprep[q]) : 0.f;
            const float h = p.gate ? a * d : activate(p.act, d);
            if (need_up) c_up[q] = w * h;
            if (!need_gu) continue;
            if (gwp) gwp[q] = gu[b] * h;
            const float gh = w * gu[b];
            if (p.gate) {
              gd[b] = gh * a;
              gg[b] = gh * d * activate_grad(p.act, gprep[q]);
            } else {
              gd[b] = gh * activate_grad(p.act, d);
            }
            if (!c_down.empty()) c_down[q] = gd[b];
            if (need_gate) c_gate[q] = gg[b];
          }
          if (need_x) {
            block_rows(p, id, count, p.down, zero_row.data(), rows);
            multi_axpy(gd, rows, acc.data(), H);
            if (p.gate) {
              block_rows(p, id, count, p.gate, zero_row.data(), rows);
              multi_axpy(gg, rows, acc.data(), H);
            }
          }
        }
        if (need_x) std::copy(acc.begin(), acc.end(), gxp + t * H);
      }
    });
  }

  Tensor uniq = at::empty({0}, ids.options());
  Tensor g_down = empty(), g_up = empty(), g_gate = empty(), g_bias = empty();
  if (need_down || need_up || need_gate || need_bias) {
    // Stage 2: pairs grouped by expert; one task sums each unique expert's pairs in order.
    const std::vector<uint64_t> keys = sort_live_pairs(p);
    const int64_t L = static_cast<int64_t>(keys.size());
    std::vector<int64_t> starts;
    for (int64_t j = 0; j < L; ++j)
      if (j == 0 || keys[j] >> 32 != keys[j - 1] >> 32) starts.push_back(j);
    const int64_t U = static_cast<int64_t>(starts.size());
    starts.push_back(L);
    uniq = at::empty({U}, ids.options());
    int64_t* up_ids = uniq.data_ptr<int64_t>();
    for (int64_t u = 0; u < U; ++u) up_ids[u] = int64_t(keys[starts[u]] >> 32);
    // not zeroed: each row is written by its first pair (a pass over (U, H) saved)
    if (need_down) advise_huge_pages(g_down = at::empty({U, H}, opts));
    if (need_up) advise_huge_pages(g_up = at::empty({U, H}, opts));
    if (need_gate) advise_huge_pages(g_gate = at::empty({U, H}, opts));
    if (need_bias) g_bias = at::empty({U}, opts);
    float* gdp = need_down ? g_down.data_ptr<float>() : nullptr;
    float* gup = need_up ? g_up.data_ptr<float>() : nullptr;
    float* ggp = need_gate ? g_gate.data_ptr<float>() : nullptr;
    float* gbp = need_bias ? g_bias.data_ptr<float>() : nullptr;
    const float* row_a = gdp || ggp ? p.x : nullptr;  // rows read per pair: x, grad_y
    const float* row_b = gup ? gyp : nullptr;
    at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
      const int64_t j_end = starts[end];
      // each expert's rows are summed in L1, then streamed out once
      std::vector<float> sum_down(gdp ? H : 0), sum_up(gup ? H : 0), sum_gate(ggp ? H : 0);
      for (int64_t u = begin; u < end; ++u) {
        float bias_sum = 0.f;
        for (int64_t j = starts[u]; j < starts[u + 1]; ++j) {
          if (j + kAhead < j_end) {  // the token rows are in L2/L3, not L1: fetch ahead
            const int64_t t_next = int64_t(keys[j + kAhead] & 0xffffffffu) / S;
            if (row_a) prefetch_row(row_a + t_next * H, H);
            if (row_b) prefetch_row(row_b + t_next * H, H);
          }
          const int64_t q = int64_t(keys[j] & 0xffffffffu), t = q / S;
          const auto add = j == starts[u] ? scale : axpy;
          if (gdp) add(c_down[q], p.x + t * H, sum_down.data(), H);
          if (gup) add(c_up[q], gyp + t * H, sum_up.data(), H);
          if (ggp) add(c_gate[q], p.x + t * H, sum_gate.data(), H);
          if (gbp) bias_sum += c_down[q];
        }
        if (gdp) stream_row(sum_down.data(), gdp + u * H, H);
        if (gup) stream_row(sum_up.data(), gup + u * H, H);
        if (ggp) stream_row(sum_gate.data(), ggp + u * H, H);
        if (gbp) gbp[u] = bias_sum;
      }
#ifdef __AVX512F__
      _mm_sfence();  // the streamed rows are visible before the task reports done
#endif
    });
  }
  return {grad_x, grad_w, uniq, g_down, g_up, g_gate, g_bias};
}

}  // namespace

// decode.cpp defines the library; this file adds to it.
TORCH_LIBRARY_FRAGMENT(moefy_cpu, m) {
  m.def(
      "peer_forward(Tensor x, Tensor ids, Tensor weights, Tensor down, Tensor up, "
      "Tensor? down_bias, Tensor? gate, str activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "peer_backward(Tensor grad_y, Tensor x, Tensor ids, Tensor weights, Tensor down, "
      "Tensor up, Tensor? down_bias, Tensor? gate, Tensor pre, Tensor gpre, str activation, "
      "bool need_x, bool need_w, bool need_down, bool need_up, bool need_gate, "
      "bool need_bias) -> Tensor[]");
  m.def("advise_huge_pages(Tensor t) -> bool");
}

TORCH_LIBRARY_IMPL(moefy_cpu, CPU, m) {
  m.impl("peer_forward", peer_forward);
  m.impl("peer_backward", peer_backward);
  m.impl("advise_huge_pages", advise_huge_pages);
}

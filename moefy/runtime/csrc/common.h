// What moefy's C++ CPU kernels share: the 16-float vector type and the expert activations.
// Included by decode.cpp, peer.cpp and search.cpp (each in its own translation unit, so
// everything here is inline and lives in an unnamed namespace).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace {

// 16 floats: one AVX-512 register, two AVX2 ones; GCC/Clang lower it to what the target has.
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(v16 v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

enum class Act { relu, gelu, gelu_tanh, silu, squared_relu, quick_gelu, hardswish };

inline Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::relu;
  if (name == "gelu") return Act::gelu;
  if (name == "gelu_tanh") return Act::gelu_tanh;
  if (name == "silu") return Act::silu;
  if (name == "squared_relu") return Act::squared_relu;
  if (name == "quick_gelu") return Act::quick_gelu;
  if (name == "hardswish") return Act::hardswish;
  TORCH_CHECK(false, "moefy kernels: unknown activation '", name, "'");
}

constexpr float kGeluTanhC = 0.79788456080286536f;  // sqrt(2 / pi)

inline float activate(Act act, float v) {
  switch (act) {
    case Act::relu: return v > 0.f ? v : 0.f;
    case Act::gelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Act::gelu_tanh:
      return 0.5f * v * (1.f + std::tanh(kGeluTanhC * (v + 0.044715f * v * v * v)));
    case Act::silu: return v / (1.f + std::exp(-v));
    case Act::squared_relu: return v > 0.f ? v * v : 0.f;
    case Act::quick_gelu: return v / (1.f + std::exp(-1.702f * v));
    case Act::hardswish: return v * std::min(std::max(v + 3.f, 0.f), 6.f) / 6.f;
  }
  return v;
}

}  // namespace

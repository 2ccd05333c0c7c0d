// Small vector helpers over ATen's Vectorized<float>, shared by the fused CPU ops.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace pykd {

using Vec = at::vec::Vectorized<float>;

inline float horizontal_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float total = 0.f;
  for (int k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

inline float horizontal_max(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float best = lanes[0];
  for (int k = 1; k < Vec::size(); ++k) best = std::max(best, lanes[k]);
  return best;
}

inline float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (n >= Vec::size()) {
    Vec acc = Vec::loadu(x);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
    best = horizontal_max(acc);
  }
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// Index of the first largest element; 0 when nothing compares equal to the maximum (NaN in the row).
inline int64_t first_argmax(const float* x, int64_t n) {
  const float* hit = std::find(x, x + n, row_max(x, n));
  return hit == x + n ? 0 : hit - x;
}

}  // namespace pykd

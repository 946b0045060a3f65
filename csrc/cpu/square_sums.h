// Sums of squares down the rows of a strided matrix, on explicit vectors: the diagonal GGN of a
// conv head (rows = one channel plane of every image) and of a Linear head (rows = tokens).
#pragma once

#include "cpu/simd.h"

namespace bdx::cpu {

// sums[j] += Σ_r src[r·row_stride + j]², for r < rows and j < length, accumulated in Out (float or
// double; at least the accumulation type of T).
template <int kBytes, typename Out, typename T>
void add_square_sums(const T* src, int64_t rows, int64_t row_stride, int64_t length, Out* sums) {
  using V = Simd<Out, kBytes>;
  constexpr int kL = kLanes<Out, kBytes>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = src + r * row_stride;
    int64_t j = 0;
    for (; j + kL <= length; j += kL) {
      const V x = load_widened<kBytes, Out>(row + j);
      store_lanes<kBytes>(sums + j, load_lanes<kBytes, true>(sums + j, 1) + x * x);
    }
    for (; j < length; ++j) {
      const Out x = load<Out>(row, j);
      sums[j] += x * x;
    }
  }
}

struct AddSquareSums {
  BDX_ISA_VARIANTS(add_square_sums)
};

}  // namespace bdx::cpu

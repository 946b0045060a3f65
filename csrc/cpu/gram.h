// Gram matrices G += Aᵀ·A in blocks of columns: only the blocks on and above the diagonal are
// formed (k(k+1)/2 of the k² block products, about half the work of one GEMM for large G), and
// the lower blocks are copied from them once at the end, so G comes out exactly symmetric.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

namespace bdx::cpu {

// Columns per block: large enough for efficient GEMMs, small enough that several blocks share the
// work on heads of ~1k–3k features.
constexpr int64_t kGramBlock = 512;

// gram (M × M) += rowsᵀ·rows on and above the diagonal blocks; `rows` is (n, M), any strides BLAS
// takes (a transposed view included).
inline void add_upper_gram(const at::Tensor& gram, const at::Tensor& rows) {
  const int64_t m = gram.size(0);
  for (int64_t i = 0; i < m; i += kGramBlock) {
    const int64_t bi = std::min(kGramBlock, m - i);
    const at::Tensor left = rows.narrow(1, i, bi).t();
    for (int64_t j = i; j < m; j += kGramBlock) {
      const int64_t bj = std::min(kGramBlock, m - j);
      gram.narrow(0, i, bi).narrow(1, j, bj).addmm_(left, rows.narrow(1, j, bj));
    }
  }
}

// Copies the upper triangle of a contiguous square matrix onto the lower one.
template <typename Acc>
void mirror_upper(const at::Tensor& gram) {
  const int64_t m = gram.size(0);
  Acc* g = gram.data_ptr<Acc>();
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < r; ++c) g[r * m + c] = g[c * m + r];
    }
  });
}

}  // namespace bdx::cpu

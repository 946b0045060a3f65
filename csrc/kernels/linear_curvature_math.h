// Fitting sums of a Linear head on rows of features (docs/MATH.md §1.2, §8), shared by the CPU and CUDA
// kernels. φ is (samples, tokens, D) row-major: the leading dim is the sample (an image; for a
// transformer all of its tokens together), every further dim but the last is flattened into tokens.
// The residual r = f − y is (samples, tokens, C). The bias enters as the augmented feature φ̃[D] = 1,
// so one sum serves the weights and the bias:
//   diag GGN          h[j]    = Σ_rows φ[j]²                                  (D,)
//   per-sample EF     E[c, j] = Σ_n (Σ_t r[n, t, c] · φ̃[n, t, j])²             (C, D + 1)
//   augmented Gram    A[i, j] = Σ_rows φ̃[i] · φ̃[j]                            (D + 1, D + 1)
// All three accumulate in float64 for every input dtype: a batch holds 10⁴–10⁶ rows.
#pragma once

#include "kernels/platform.h"

namespace bdx {

struct TokenGeometry {
  int64_t samples, tokens, features, outputs;  // outputs: C of the residual (EF only)

  BDX_HD int64_t rows() const { return samples * tokens; }
  BDX_HD int64_t augmented() const { return features + 1; }
};

// Entry j of the augmented row [φ; 1]: φ[j] for j < D, 1 at j == D, 0 past it (a tile's tail).
template <typename Acc, typename T>
BDX_HD Acc augmented_feature(const T* row, int64_t j, int64_t features) {
  if (j < features) return load<Acc>(row, j);
  return j == features ? Acc(1) : Acc(0);
}

}  // namespace bdx

// The one rule every op applies to the variances it returns (docs/MATH.md §1.1, §2).
#pragma once

#include "kernels/platform.h"

namespace bdx {

// A variance, with the negative values that rounding, a noisy Monte Carlo covariance or a negative
// input variance can produce set to 0. A NaN stays a NaN: clamping must not hide broken inputs.
// `V` is a scalar or (on the CPU) a GCC/Clang vector type, for which `<` and `?:` work lane by lane.
template <typename V>
BDX_HD V clamp_variance(V v) {
  return v < V{} ? V{} : v;
}

}  // namespace bdx

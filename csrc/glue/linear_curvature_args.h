// Validated, contiguous arguments and zero-filled float64 outputs of the Linear-head fitting sums
// (linear_diag_ggn, linear_diag_ef, linear_gram), for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/linear_curvature_math.h"

namespace bdx::glue {

struct LinearCurvatureArgs {
  at::Tensor phi;       // contiguous, read as (rows, D)
  at::Tensor residual;  // contiguous, read as (rows, C); undefined except for linear_diag_ef
  TokenGeometry geometry;
  at::Tensor out;  // zero-filled float64
};

// out: (D,).
LinearCurvatureArgs prepare_linear_diag_ggn(const at::Tensor& phi);
// out: (C, D + 1); phi (N, ..., D) and residual (N, ..., C) with the same leading dims.
LinearCurvatureArgs prepare_linear_diag_ef(const at::Tensor& phi, const at::Tensor& residual);
// out: (D + 1, D + 1).
LinearCurvatureArgs prepare_linear_gram(const at::Tensor& phi);

// The ops as registered (schemas.h): a backend supplies only `compute`, which accumulates into the
// zero-filled `out` of the prepared arguments.
template <void (*compute)(const LinearCurvatureArgs&)>
at::Tensor linear_diag_ggn(const at::Tensor& phi) {
  const auto args = prepare_linear_diag_ggn(phi);
  compute(args);
  return args.out;
}

template <void (*compute)(const LinearCurvatureArgs&)>
at::Tensor linear_diag_ef(const at::Tensor& phi, const at::Tensor& residual) {
  const auto args = prepare_linear_diag_ef(phi, residual);
  compute(args);
  return args.out;
}

template <void (*compute)(const LinearCurvatureArgs&)>
at::Tensor linear_gram(const at::Tensor& phi) {
  const auto args = prepare_linear_gram(phi);
  compute(args);
  return args.out;
}

}  // namespace bdx::glue

// Validated, contiguous arguments, patch geometry and zero-filled outputs of the curvature
// accumulators (conv_diag_ggn, conv_diag_ef, conv_patch_gram), for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/curvature_math.h"

namespace bdx::glue {

struct CurvatureArgs {
  at::Tensor phi;       // (N, C_in, H, W), contiguous
  at::Tensor residual;  // (N, C, H_out, W_out), contiguous; undefined except for conv_diag_ef
  PatchGeometry geometry;
  at::Tensor out;  // zero-filled; float32 for 16-bit and float32 inputs, float64 for float64
};

// out: (C_in, kh, kw).
CurvatureArgs prepare_conv_diag_ggn(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation);
// out: (C, C_in, kh, kw), C = residual.size(1).
CurvatureArgs prepare_conv_diag_ef(const at::Tensor& phi, const at::Tensor& residual, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
// out: (D + 1, D + 1), D = C_in·kh·kw.
CurvatureArgs prepare_conv_patch_gram(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation);

// The ops as registered (schemas.h): validation and allocation are the same for every backend, so
// a backend supplies only `compute`, which accumulates into the zero-filled `out` of the prepared
// arguments.
template <void (*compute)(const CurvatureArgs&)>
at::Tensor conv_diag_ggn(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto args = prepare_conv_diag_ggn(phi, kernel_size, stride, padding, dilation);
  compute(args);
  return args.out;
}

template <void (*compute)(const CurvatureArgs&)>
at::Tensor conv_diag_ef(const at::Tensor& phi, const at::Tensor& residual, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto args = prepare_conv_diag_ef(phi, residual, kernel_size, stride, padding, dilation);
  compute(args);
  return args.out;
}

template <void (*compute)(const CurvatureArgs&)>
at::Tensor conv_patch_gram(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto args = prepare_conv_patch_gram(phi, kernel_size, stride, padding, dilation);
  compute(args);
  return args.out;
}

}  // namespace bdx::glue

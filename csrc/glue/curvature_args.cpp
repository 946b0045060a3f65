#include "glue/curvature_args.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "glue/conv_geometry.h"
#include "glue/tensor_checks.h"

namespace bdx::glue {
namespace {

// Checks φ and the convolution parameters (groups = 1 only) and derives the output size exactly as
// conv2d does.
PatchGeometry checked_geometry(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, const char* op) {
  check_floating(phi, op, "phi");
  TORCH_CHECK(phi.dim() == 4, op, ": `phi` must have shape (N, C_in, H, W), got ", phi.sizes());
  // A head without input channels has no weights (and F.unfold, the reference, rejects it).
  TORCH_CHECK_VALUE(phi.size(1) >= 1, op, ": `phi` must have at least one channel (C_in >= 1), got shape ",
                    phi.sizes());
  check_pair(kernel_size, op, "kernel_size", 1);
  PatchGeometry g{};
  set_stride_padding_dilation(g, stride, padding, dilation, op);
  g.batch = phi.size(0);
  g.channels = phi.size(1);
  g.height = phi.size(2);
  g.width = phi.size(3);
  g.kernel_h = kernel_size[0];
  g.kernel_w = kernel_size[1];
  const int64_t span_h = g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dilation_w * (g.kernel_w - 1) + 1;
  TORCH_CHECK(g.height + 2 * g.pad_h >= span_h && g.width + 2 * g.pad_w >= span_w, op,
              ": the dilated kernel spans ", span_h, "x", span_w, " but `phi` padded by `padding` is only ",
              g.height + 2 * g.pad_h, "x", g.width + 2 * g.pad_w);
  g.out_h = (g.height + 2 * g.pad_h - span_h) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - span_w) / g.stride_w + 1;
  return g;
}

at::TensorOptions result_options(const at::Tensor& phi) {
  return phi.options().dtype(result_dtype(phi.scalar_type()));
}

}  // namespace

CurvatureArgs prepare_conv_diag_ggn(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  const PatchGeometry g = checked_geometry(phi, kernel_size, stride, padding, dilation, "conv_diag_ggn");
  return CurvatureArgs{phi.contiguous(), at::Tensor(), g,
                       at::zeros({g.channels, g.kernel_h, g.kernel_w}, result_options(phi))};
}

CurvatureArgs prepare_conv_diag_ef(const at::Tensor& phi, const at::Tensor& residual, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "conv_diag_ef";
  const PatchGeometry g = checked_geometry(phi, kernel_size, stride, padding, dilation, op);
  TORCH_CHECK(residual.dim() == 4, op, ": `residual` must have shape (N, C, H_out, W_out) = (", g.batch, ", C, ",
              g.out_h, ", ", g.out_w, "), got ", residual.sizes());
  check_like(residual, op, "residual", phi, "phi", {g.batch, residual.size(1), g.out_h, g.out_w});
  return CurvatureArgs{phi.contiguous(), residual.contiguous(), g,
                       at::zeros({residual.size(1), g.channels, g.kernel_h, g.kernel_w}, result_options(phi))};
}

CurvatureArgs prepare_conv_patch_gram(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const PatchGeometry g = checked_geometry(phi, kernel_size, stride, padding, dilation, "conv_patch_gram");
  const int64_t augmented = g.patch_size() + 1;
  return CurvatureArgs{phi.contiguous(), at::Tensor(), g, at::zeros({augmented, augmented}, result_options(phi))};
}

}  // namespace bdx::glue

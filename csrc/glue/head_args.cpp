#include "glue/head_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

#include "glue/conv_geometry.h"
#include "glue/tensor_checks.h"

namespace bdx::glue {
namespace {

void check_device_and_dtype(const at::Tensor& t, const char* op, const char* name, const at::Tensor& phi) {
  check_like(t, op, name, phi, "phi", t.sizes());
}

// Parameters are read by every output pixel: convert them once to the accumulation dtype.
at::Tensor as_accumulation(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

at::Tensor optional_vector(const std::optional<at::Tensor>& t, const char* op, const char* name,
                           const at::Tensor& phi, int64_t length, const char* length_meaning, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_device_and_dtype(*t, op, name, phi);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == length, op, ": `", name, "` must have shape (", length, ",) (",
              length_meaning, "), got ", t->sizes());
  return as_accumulation(*t, acc);
}

void check_features(const at::Tensor& phi, const char* op) {
  check_floating(phi, op, "phi");
  TORCH_CHECK(phi.dim() == 4, op, ": `phi` must be the head's input features (B, C_in, H, W), got shape ",
              phi.sizes());
}

// Fills everything but the output channels and groups.
ConvGeometry conv_geometry(const at::Tensor& phi, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, const char* op,
                           const char* weight_name) {
  ConvGeometry g{};
  set_stride_padding_dilation(g, stride, padding, dilation, op);
  g.batch = phi.size(0);
  g.in_channels = phi.size(1);
  g.in_h = phi.size(2);
  g.in_w = phi.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.groups = 1;
  g.out_h = conv_output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_w = conv_output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  TORCH_CHECK(g.kernel_h >= 1 && g.kernel_w >= 1, op, ": `", weight_name, "` has an empty kernel, shape ",
              weight.sizes());
  TORCH_CHECK(g.out_h >= 1 && g.out_w >= 1, op, ": the ", g.kernel_h, "x", g.kernel_w, " kernel of `", weight_name,
              "` with dilation ", dilation, " does not fit `phi` of spatial size ", g.in_h, "x", g.in_w,
              " with padding ", padding, " (the output would be ", g.out_h, "x", g.out_w, ")");
  return g;
}

}  // namespace

ConvHeadMeanVarArgs prepare_conv_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& weight_var,
                                               const std::optional<at::Tensor>& bias_var, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_head_mean_var";
  check_features(phi, op);
  check_device_and_dtype(weight, op, "weight", phi);
  TORCH_CHECK(weight.dim() == 4, op, ": `weight` must be a Conv2d weight (C, C_in/groups, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1, op, ": `groups` must be >= 1, got ", groups);
  const int64_t channels = weight.size(0);
  TORCH_CHECK(channels % groups == 0, op, ": `weight` has ", channels, " output channels, not divisible by groups = ",
              groups);
  TORCH_CHECK(weight.size(1) * groups == phi.size(1), op, ": `weight` expects ", weight.size(1) * groups,
              " input channels (", weight.size(1), " per group x ", groups, " groups) but `phi` has ", phi.size(1),
              " (shape ", phi.sizes(), ")");
  check_like(weight_var, op, "weight_var", phi, "phi", weight.sizes());

  ConvGeometry g = conv_geometry(phi, weight, stride, padding, dilation, op, "weight");
  g.groups = groups;
  const auto acc = result_dtype(phi.scalar_type());
  const auto out_options = phi.options().dtype(acc);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  return ConvHeadMeanVarArgs{phi.contiguous(),
                             as_accumulation(weight, acc),
                             as_accumulation(weight_var, acc),
                             optional_vector(bias, op, "bias", phi, channels, "one per output channel", acc),
                             optional_vector(bias_var, op, "bias_var", phi, channels, "one per output channel", acc),
                             g,
                             at::empty(out_shape, out_options),
                             at::empty(out_shape, out_options)};
}

LinearHeadMeanVarArgs prepare_linear_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& weight_var,
                                                   const std::optional<at::Tensor>& bias_var) {
  constexpr const char* op = "linear_head_mean_var";
  check_floating(phi, op, "phi");
  TORCH_CHECK(phi.dim() >= 1, op, ": `phi` must have shape (..., D), got a 0-d tensor");
  check_device_and_dtype(weight, op, "weight", phi);
  const int64_t features = phi.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features, op,
              ": `weight` must be a Linear weight (C, D) with D = ", features, " (the last dim of `phi`), got shape ",
              weight.sizes());
  check_like(weight_var, op, "weight_var", phi, "phi", weight.sizes());
  const int64_t out_features = weight.size(0);
  const auto acc = result_dtype(phi.scalar_type());
  std::vector<int64_t> out_shape(phi.sizes().begin(), phi.sizes().end());
  out_shape.back() = out_features;
  const auto out_options = phi.options().dtype(acc);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < phi.dim(); ++d) rows *= phi.size(d);
  return LinearHeadMeanVarArgs{phi.contiguous(),
                               as_accumulation(weight, acc),
                               as_accumulation(weight_var, acc),
                               optional_vector(bias, op, "bias", phi, out_features, "one per output", acc),
                               optional_vector(bias_var, op, "bias_var", phi, out_features, "one per output", acc),
                               rows,
                               features,
                               out_features,
                               at::empty(out_shape, out_options),
                               at::empty(out_shape, out_options)};
}

ConvHeadVarFactoredArgs prepare_conv_head_var_factored(const at::Tensor& phi, const at::Tensor& proj_weight,
                                                       const std::optional<at::Tensor>& proj_bias,
                                                       const at::Tensor& mix,
                                                       const std::optional<at::Tensor>& bias_var,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation) {
  constexpr const char* op = "conv_head_var_factored";
  check_features(phi, op);
  check_device_and_dtype(proj_weight, op, "proj_weight", phi);
  TORCH_CHECK(proj_weight.dim() == 4 && proj_weight.size(1) == phi.size(1), op,
              ": `proj_weight` must hold R projection directions as a conv weight (R, C_in, kh, kw) with C_in = ",
              phi.size(1), " (from `phi`), got shape ", proj_weight.sizes());
  const int64_t rank = proj_weight.size(0);
  check_device_and_dtype(mix, op, "mix", phi);
  TORCH_CHECK(mix.dim() == 2 && mix.size(1) == rank, op, ": `mix` must have shape (C, R) with R = ", rank,
              " (the directions of `proj_weight`), got ", mix.sizes());
  const int64_t channels = mix.size(0);

  const ConvGeometry g = conv_geometry(phi, proj_weight, stride, padding, dilation, op, "proj_weight");
  const auto acc = result_dtype(phi.scalar_type());
  return ConvHeadVarFactoredArgs{
      phi.contiguous(),
      as_accumulation(proj_weight, acc),
      optional_vector(proj_bias, op, "proj_bias", phi, rank, "one per direction R", acc),
      as_accumulation(mix, acc),
      optional_vector(bias_var, op, "bias_var", phi, channels, "one per output channel C", acc),
      g,
      channels,
      at::empty({g.batch, channels, g.out_h, g.out_w}, phi.options().dtype(acc))};
}

}  // namespace bdx::glue

// Validated, contiguous arguments and allocated outputs of the head ops, for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "kernels/head_math.h"

namespace bdx::glue {

// phi keeps its dtype; the (small) parameter tensors are converted to the accumulation dtype, so
// kernels read them without conversion and 16-bit weights cost nothing extra per use.
struct ConvHeadMeanVarArgs {
  at::Tensor phi;                 // (B, C_in, H, W) contiguous
  at::Tensor weight, weight_var;  // (C, C_in/groups, kh, kw)
  at::Tensor bias, bias_var;      // (C,); undefined when absent
  ConvGeometry geometry;
  at::Tensor mean, var;  // (B, C, OH, OW)
};

ConvHeadMeanVarArgs prepare_conv_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& weight_var,
                                               const std::optional<at::Tensor>& bias_var, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

struct LinearHeadMeanVarArgs {
  at::Tensor phi;                 // (rows, D) contiguous
  at::Tensor weight, weight_var;  // (C, D)
  at::Tensor bias, bias_var;      // (C,); undefined when absent
  int64_t rows, features, out_features;
  at::Tensor mean, var;  // (..., C), viewed by the kernels as (rows, C)
};

LinearHeadMeanVarArgs prepare_linear_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& weight_var,
                                                   const std::optional<at::Tensor>& bias_var);

// `geometry` is that of the projection conv (out_channels = rank R); `channels` is C.
struct ConvHeadVarFactoredArgs {
  at::Tensor phi;          // (B, C_in, H, W) contiguous
  at::Tensor proj_weight;  // (R, C_in, kh, kw)
  at::Tensor proj_bias;    // (R,); undefined when absent
  at::Tensor mix;          // (C, R)
  at::Tensor bias_var;     // (C,); undefined when absent
  ConvGeometry geometry;
  int64_t channels;
  at::Tensor var;  // (B, C, OH, OW)
};

ConvHeadVarFactoredArgs prepare_conv_head_var_factored(const at::Tensor& phi, const at::Tensor& proj_weight,
                                                       const std::optional<at::Tensor>& proj_bias,
                                                       const at::Tensor& mix,
                                                       const std::optional<at::Tensor>& bias_var,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation);

// The ops as registered (schemas.h): validation and allocation are the same for every backend, so
// a backend supplies only `compute`, which fills the outputs of the prepared arguments.
template <void (*compute)(const ConvHeadMeanVarArgs&)>
std::tuple<at::Tensor, at::Tensor> conv_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& weight_var,
                                                      const std::optional<at::Tensor>& bias_var, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      int64_t groups) {
  const auto args =
      prepare_conv_head_mean_var(phi, weight, bias, weight_var, bias_var, stride, padding, dilation, groups);
  compute(args);
  return {args.mean, args.var};
}

template <void (*compute)(const LinearHeadMeanVarArgs&)>
std::tuple<at::Tensor, at::Tensor> linear_head_mean_var(const at::Tensor& phi, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& weight_var,
                                                        const std::optional<at::Tensor>& bias_var) {
  const auto args = prepare_linear_head_mean_var(phi, weight, bias, weight_var, bias_var);
  compute(args);
  return {args.mean, args.var};
}

template <void (*compute)(const ConvHeadVarFactoredArgs&)>
at::Tensor conv_head_var_factored(const at::Tensor& phi, const at::Tensor& proj_weight,
                                  const std::optional<at::Tensor>& proj_bias, const at::Tensor& mix,
                                  const std::optional<at::Tensor>& bias_var, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto args =
      prepare_conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, stride, padding, dilation);
  compute(args);
  return args.var;
}

}  // namespace bdx::glue

// Every op schema of the library, in one place. The real library (bayesdiff_ext) and the host
// emulation of the CUDA kernels (bayesdiff_ext_emu) define the same schemas from here.
//
// Variances: inputs named *_var and `mix` are not checked for negative entries (a check would read
// them once more and, on a GPU, synchronise with the host on every call); every variance an op
// returns is clamped at 0 instead (kernels/variance.h; moment_step only when `clamp`), so a
// negative input never gives a negative output. NaN stays NaN.
#pragma once

#include <torch/library.h>

namespace bdx {

inline void define_schemas(torch::Library& m) {
  m.def(
      "moment_step(Tensor mean_x, Tensor var_x, Tensor eps_mean, Tensor? eps_var, Tensor? cov_x_eps, "
      "float a, float b, float c2, bool clamp=True) -> (Tensor mean_next, Tensor var_next)");
  m.def(
      "mc_moments(Tensor x, Tensor eps_mean, Tensor? eps_var, Tensor mean_x) "
      "-> (Tensor e_eps, Tensor var_eps, Tensor cov_x_eps)");
  // mc_moments then moment_step in one pass over the samples; var_eps as mc_moments returns it.
  m.def(
      "mc_moment_step(Tensor x, Tensor eps_mean, Tensor? eps_var, Tensor mean_x, Tensor var_x, "
      "float a, float b, float c2, bool clamp=True) -> (Tensor mean_next, Tensor var_next, Tensor var_eps)");
  m.def(
      "conv_head_mean_var(Tensor phi, Tensor weight, Tensor? bias, Tensor weight_var, Tensor? bias_var, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor mean, Tensor var)");
  m.def(
      "linear_head_mean_var(Tensor phi, Tensor weight, Tensor? bias, Tensor weight_var, Tensor? bias_var) "
      "-> (Tensor mean, Tensor var)");
  m.def(
      "conv_head_var_factored(Tensor phi, Tensor proj_weight, Tensor? proj_bias, Tensor mix, Tensor? bias_var, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor var");
  m.def(
      "conv_diag_ggn(Tensor phi, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) "
      "-> Tensor");
  m.def(
      "conv_diag_ef(Tensor phi, Tensor residual, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  m.def(
      "conv_patch_gram(Tensor phi, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) "
      "-> Tensor");
  // Linear heads on rows of features (..., D); float64 results for every input dtype.
  m.def("linear_diag_ggn(Tensor phi) -> Tensor");
  m.def("linear_diag_ef(Tensor phi, Tensor residual) -> Tensor");
  m.def("linear_gram(Tensor phi) -> Tensor");
}

}  // namespace bdx

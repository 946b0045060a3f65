// Validated, contiguous arguments and allocated outputs of the moment ops, for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bdx::glue {

struct MomentStepArgs {
  at::Tensor mean_x, var_x, eps_mean, eps_var, cov_x_eps;  // eps_var/cov_x_eps undefined when absent
  at::Tensor mean_next, var_next;
};

MomentStepArgs prepare_moment_step(const at::Tensor& mean_x, const at::Tensor& var_x, const at::Tensor& eps_mean,
                                   const std::optional<at::Tensor>& eps_var,
                                   const std::optional<at::Tensor>& cov_x_eps, double a, double b, double c2);

struct McMomentsArgs {
  at::Tensor x, eps_mean, eps_var, mean_x;  // eps_var undefined when absent
  int64_t samples, numel;
  at::Tensor e_eps, var_eps, cov_x_eps;
};

McMomentsArgs prepare_mc_moments(const at::Tensor& x, const at::Tensor& eps_mean,
                                 const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x);

// Typed data pointer, null for an undefined (absent) tensor.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

}  // namespace bdx::glue

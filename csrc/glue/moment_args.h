// Validated, contiguous arguments and allocated outputs of the moment ops, for every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "kernels/moment_math.h"

namespace bdx::glue {

// The scalars of one affine step x' = a·x + b·ε + c·z (checked: finite, c2 >= 0).
struct StepScalars {
  double a, b, c2;
  bool clamp;

  // In the kernels' accumulation type.
  template <typename Acc>
  MomentCoefficients<Acc> coefficients() const {
    return {static_cast<Acc>(a), static_cast<Acc>(b), static_cast<Acc>(c2), clamp};
  }
};

struct MomentStepArgs {
  at::Tensor mean_x, var_x, eps_mean, eps_var, cov_x_eps;  // eps_var/cov_x_eps undefined when absent
  StepScalars step;
  at::Tensor mean_next, var_next;
};

MomentStepArgs prepare_moment_step(const at::Tensor& mean_x, const at::Tensor& var_x, const at::Tensor& eps_mean,
                                   const std::optional<at::Tensor>& eps_var,
                                   const std::optional<at::Tensor>& cov_x_eps, double a, double b, double c2,
                                   bool clamp);

struct McMomentsArgs {
  at::Tensor x, eps_mean, eps_var, mean_x;  // eps_var undefined when absent
  int64_t samples, numel;
  at::Tensor e_eps, var_eps, cov_x_eps;
};

McMomentsArgs prepare_mc_moments(const at::Tensor& x, const at::Tensor& eps_mean,
                                 const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x);

struct McMomentStepArgs {
  at::Tensor x, eps_mean, eps_var, mean_x, var_x;  // eps_var undefined when absent
  int64_t samples, numel;
  StepScalars step;
  at::Tensor mean_next, var_next, var_eps;
};

McMomentStepArgs prepare_mc_moment_step(const at::Tensor& x, const at::Tensor& eps_mean,
                                        const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x,
                                        const at::Tensor& var_x, double a, double b, double c2, bool clamp);

// The ops as registered (schemas.h): validation and allocation are the same for every backend, so
// a backend supplies only `compute`, which fills the outputs of the prepared arguments.
template <void (*compute)(const MomentStepArgs&)>
std::tuple<at::Tensor, at::Tensor> moment_step(const at::Tensor& mean_x, const at::Tensor& var_x,
                                               const at::Tensor& eps_mean, const std::optional<at::Tensor>& eps_var,
                                               const std::optional<at::Tensor>& cov_x_eps, double a, double b,
                                               double c2, bool clamp) {
  const auto args = prepare_moment_step(mean_x, var_x, eps_mean, eps_var, cov_x_eps, a, b, c2, clamp);
  compute(args);
  return {args.mean_next, args.var_next};
}

template <void (*compute)(const McMomentsArgs&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mc_moments(const at::Tensor& x, const at::Tensor& eps_mean,
                                                          const std::optional<at::Tensor>& eps_var,
                                                          const at::Tensor& mean_x) {
  const auto args = prepare_mc_moments(x, eps_mean, eps_var, mean_x);
  compute(args);
  return {args.e_eps, args.var_eps, args.cov_x_eps};
}

template <void (*compute)(const McMomentStepArgs&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mc_moment_step(const at::Tensor& x, const at::Tensor& eps_mean,
                                                              const std::optional<at::Tensor>& eps_var,
                                                              const at::Tensor& mean_x, const at::Tensor& var_x,
                                                              double a, double b, double c2, bool clamp) {
  const auto args = prepare_mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, a, b, c2, clamp);
  compute(args);
  return {args.mean_next, args.var_next, args.var_eps};
}

}  // namespace bdx::glue

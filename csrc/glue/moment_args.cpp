#include "glue/moment_args.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "glue/tensor_checks.h"

namespace bdx::glue {
namespace {

StepScalars checked_step(const char* op, double a, double b, double c2, bool clamp) {
  check_finite_scalar(a, op, "a");
  check_finite_scalar(b, op, "b");
  check_finite_scalar(c2, op, "c2");
  TORCH_CHECK(c2 >= 0, op, ": `c2` is the variance of the fresh noise and must be >= 0, got ", c2);
  return {a, b, c2, clamp};
}

// The (S, ...) stacks of Monte Carlo samples and E[x] (shape ...); returns S.
int64_t check_samples(const char* op, const at::Tensor& x, const at::Tensor& eps_mean,
                      const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": `x` must be a stack of Monte Carlo samples with shape (S, ...), got a 0-d tensor");
  TORCH_CHECK(x.size(0) >= 1, op, ": `x` must hold at least one sample (S >= 1), got S = 0");
  check_like(eps_mean, op, "eps_mean", x, "x", x.sizes());
  check_optional_like(eps_var, op, "eps_var", x, "x", x.sizes());
  check_like(mean_x, op, "mean_x", x, "x", x.sizes().slice(1));
  return x.size(0);
}

}  // namespace

MomentStepArgs prepare_moment_step(const at::Tensor& mean_x, const at::Tensor& var_x, const at::Tensor& eps_mean,
                                   const std::optional<at::Tensor>& eps_var,
                                   const std::optional<at::Tensor>& cov_x_eps, double a, double b, double c2,
                                   bool clamp) {
  constexpr const char* op = "moment_step";
  check_floating(mean_x, op, "mean_x");
  const auto shape = mean_x.sizes();
  check_like(var_x, op, "var_x", mean_x, "mean_x", shape);
  check_like(eps_mean, op, "eps_mean", mean_x, "mean_x", shape);
  check_optional_like(eps_var, op, "eps_var", mean_x, "mean_x", shape);
  check_optional_like(cov_x_eps, op, "cov_x_eps", mean_x, "mean_x", shape);
  const StepScalars step = checked_step(op, a, b, c2, clamp);

  const auto out_options = mean_x.options().dtype(result_dtype(mean_x.scalar_type()));
  return MomentStepArgs{mean_x.contiguous(),
                        var_x.contiguous(),
                        eps_mean.contiguous(),
                        contiguous_or_undefined(eps_var),
                        contiguous_or_undefined(cov_x_eps),
                        step,
                        at::empty(shape, out_options),
                        at::empty(shape, out_options)};
}

McMomentsArgs prepare_mc_moments(const at::Tensor& x, const at::Tensor& eps_mean,
                                 const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x) {
  const int64_t samples = check_samples("mc_moments", x, eps_mean, eps_var, mean_x);

  const auto out_options = x.options().dtype(result_dtype(x.scalar_type()));
  const auto shape = mean_x.sizes();
  return McMomentsArgs{x.contiguous(),
                       eps_mean.contiguous(),
                       contiguous_or_undefined(eps_var),
                       mean_x.contiguous(),
                       samples,
                       mean_x.numel(),
                       at::empty(shape, out_options),
                       at::empty(shape, out_options),
                       at::empty(shape, out_options)};
}

McMomentStepArgs prepare_mc_moment_step(const at::Tensor& x, const at::Tensor& eps_mean,
                                        const std::optional<at::Tensor>& eps_var, const at::Tensor& mean_x,
                                        const at::Tensor& var_x, double a, double b, double c2, bool clamp) {
  constexpr const char* op = "mc_moment_step";
  const int64_t samples = check_samples(op, x, eps_mean, eps_var, mean_x);
  check_like(var_x, op, "var_x", x, "x", mean_x.sizes());
  const StepScalars step = checked_step(op, a, b, c2, clamp);

  const auto out_options = x.options().dtype(result_dtype(x.scalar_type()));
  const auto shape = mean_x.sizes();
  return McMomentStepArgs{x.contiguous(),
                          eps_mean.contiguous(),
                          contiguous_or_undefined(eps_var),
                          mean_x.contiguous(),
                          var_x.contiguous(),
                          samples,
                          mean_x.numel(),
                          step,
                          at::empty(shape, out_options),
                          at::empty(shape, out_options),
                          at::empty(shape, out_options)};
}

}  // namespace bdx::glue

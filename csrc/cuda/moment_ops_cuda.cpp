// CUDA glue of the moment ops: checks, device guard, stream, launch. Compiled by the host compiler
// twice: against the real CUDA runtime (torch.ops.bayesdiff_ext.*, CUDA key) and, with
// BDX_CUDA_EMULATION, against the host emulation (torch.ops.bayesdiff_ext_emu.*, CPU key).
#include <torch/library.h>

#include <tuple>

#include "glue/dtype_dispatch.h"
#include "glue/moment_args.h"
#include "cuda/glue_backend.h"
#include "cuda/moment_kernels.h"

namespace bdx::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> moment_step(const at::Tensor& mean_x, const at::Tensor& var_x,
                                               const at::Tensor& eps_mean, const std::optional<at::Tensor>& eps_var,
                                               const std::optional<at::Tensor>& cov_x_eps, double a, double b,
                                               double c2, bool clamp) {
  auto args = glue::prepare_moment_step(mean_x, var_x, eps_mean, eps_var, cov_x_eps, a, b, c2);
  const DeviceScope scope(args.mean_x);
  BDX_DISPATCH_FLOATING(args.mean_x.scalar_type(), "moment_step", [&] {
    using Acc = acc_t<T>;
    const MomentCoefficients<Acc> k{static_cast<Acc>(a), static_cast<Acc>(b), static_cast<Acc>(c2), clamp};
    check_launch(launch_moment_step<T>(glue::data_or_null<T>(args.mean_x), glue::data_or_null<T>(args.var_x),
                                       glue::data_or_null<T>(args.eps_mean), glue::data_or_null<T>(args.eps_var),
                                       glue::data_or_null<T>(args.cov_x_eps), k, args.mean_x.numel(),
                                       args.mean_next.data_ptr<Acc>(), args.var_next.data_ptr<Acc>(), scope.stream()));
  });
  return {args.mean_next, args.var_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mc_moments(const at::Tensor& x, const at::Tensor& eps_mean,
                                                          const std::optional<at::Tensor>& eps_var,
                                                          const at::Tensor& mean_x) {
  auto args = glue::prepare_mc_moments(x, eps_mean, eps_var, mean_x);
  const DeviceScope scope(args.x);
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moments", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_mc_moments<T>(glue::data_or_null<T>(args.x), glue::data_or_null<T>(args.eps_mean),
                                      glue::data_or_null<T>(args.eps_var), glue::data_or_null<T>(args.mean_x),
                                      args.samples, args.numel, args.e_eps.data_ptr<Acc>(),
                                      args.var_eps.data_ptr<Acc>(), args.cov_x_eps.data_ptr<Acc>(), scope.stream()));
  });
  return {args.e_eps, args.var_eps, args.cov_x_eps};
}

}  // namespace
}  // namespace bdx::cuda

TORCH_LIBRARY_IMPL(BDX_GLUE_LIBRARY, BDX_GLUE_DISPATCH_KEY, m) {
  m.impl("moment_step", &bdx::cuda::moment_step);
  m.impl("mc_moments", &bdx::cuda::mc_moments);
}

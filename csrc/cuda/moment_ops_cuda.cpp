// CUDA glue of the moment ops: checks, device guard, stream, launch. Compiled by the host compiler
// twice: against the real CUDA runtime (torch.ops.bayesdiff_ext.*, CUDA key) and, with
// BDX_CUDA_EMULATION, against the host emulation (torch.ops.bayesdiff_ext_emu.*, CPU key).
#include <torch/library.h>

#include "glue/dtype_dispatch.h"
#include "glue/moment_args.h"
#include "glue/tensor_checks.h"
#include "cuda/glue_backend.h"
#include "cuda/moment_kernels.h"

namespace bdx::cuda {
namespace {

void compute_moment_step(const glue::MomentStepArgs& args) {
  const DeviceScope scope(args.mean_x);
  BDX_DISPATCH_FLOATING(args.mean_x.scalar_type(), "moment_step", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_moment_step<T>(glue::data_or_null<T>(args.mean_x), glue::data_or_null<T>(args.var_x),
                                       glue::data_or_null<T>(args.eps_mean), glue::data_or_null<T>(args.eps_var),
                                       glue::data_or_null<T>(args.cov_x_eps), args.step.coefficients<Acc>(),
                                       args.mean_x.numel(), args.mean_next.data_ptr<Acc>(),
                                       args.var_next.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_mc_moments(const glue::McMomentsArgs& args) {
  const DeviceScope scope(args.x);
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moments", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_mc_moments<T>(glue::data_or_null<T>(args.x), glue::data_or_null<T>(args.eps_mean),
                                      glue::data_or_null<T>(args.eps_var), glue::data_or_null<T>(args.mean_x),
                                      args.samples, args.numel, args.e_eps.data_ptr<Acc>(),
                                      args.var_eps.data_ptr<Acc>(), args.cov_x_eps.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_mc_moment_step(const glue::McMomentStepArgs& args) {
  const DeviceScope scope(args.x);
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moment_step", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_mc_moment_step<T>(
        glue::data_or_null<T>(args.x), glue::data_or_null<T>(args.eps_mean), glue::data_or_null<T>(args.eps_var),
        glue::data_or_null<T>(args.mean_x), glue::data_or_null<T>(args.var_x), args.step.coefficients<Acc>(),
        args.samples, args.numel, args.mean_next.data_ptr<Acc>(), args.var_next.data_ptr<Acc>(),
        args.var_eps.data_ptr<Acc>(), scope.stream()));
  });
}

}  // namespace
}  // namespace bdx::cuda

TORCH_LIBRARY_IMPL(BDX_GLUE_LIBRARY, BDX_GLUE_DISPATCH_KEY, m) {
  m.impl("moment_step", &bdx::glue::moment_step<&bdx::cuda::compute_moment_step>);
  m.impl("mc_moments", &bdx::glue::mc_moments<&bdx::cuda::compute_mc_moments>);
  m.impl("mc_moment_step", &bdx::glue::mc_moment_step<&bdx::cuda::compute_mc_moment_step>);
}

// CUDA glue of the Linear-head fitting sums: device guard, stream, launch. Compiled by the host
// compiler twice: against the real CUDA runtime (torch.ops.bayesdiff_ext.*, CUDA key) and, with
// BDX_CUDA_EMULATION, against the host emulation (torch.ops.bayesdiff_ext_emu.*, CPU key).
#include <torch/library.h>

#include "cuda/glue_backend.h"
#include "cuda/linear_curvature_kernels.h"
#include "glue/dtype_dispatch.h"
#include "glue/linear_curvature_args.h"
#include "glue/tensor_checks.h"

namespace bdx::cuda {
namespace {

void compute_linear_diag_ggn(const glue::LinearCurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_diag_ggn", [&] {
    check_launch(launch_linear_diag_ggn<T>(glue::data_or_null<T>(args.phi), args.geometry,
                                           args.out.data_ptr<double>(), scope.stream()));
  });
}

void compute_linear_diag_ef(const glue::LinearCurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_diag_ef", [&] {
    check_launch(launch_linear_diag_ef<T>(glue::data_or_null<T>(args.phi), glue::data_or_null<T>(args.residual),
                                          args.geometry, args.out.data_ptr<double>(), scope.stream()));
  });
}

void compute_linear_gram(const glue::LinearCurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_gram", [&] {
    check_launch(launch_linear_gram<T>(glue::data_or_null<T>(args.phi), args.geometry, args.out.data_ptr<double>(),
                                       scope.stream()));
  });
}

}  // namespace
}  // namespace bdx::cuda

TORCH_LIBRARY_IMPL(BDX_GLUE_LIBRARY, BDX_GLUE_DISPATCH_KEY, m) {
  m.impl("linear_diag_ggn", &bdx::glue::linear_diag_ggn<&bdx::cuda::compute_linear_diag_ggn>);
  m.impl("linear_diag_ef", &bdx::glue::linear_diag_ef<&bdx::cuda::compute_linear_diag_ef>);
  m.impl("linear_gram", &bdx::glue::linear_gram<&bdx::cuda::compute_linear_gram>);
}

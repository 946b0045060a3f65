// CUDA glue of the curvature accumulators: checks, device guard, stream, launch. Compiled by the
// host compiler twice: against the real CUDA runtime (torch.ops.bayesdiff_ext.*, CUDA key) and,
// with BDX_CUDA_EMULATION, against the host emulation (torch.ops.bayesdiff_ext_emu.*, CPU key).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda/curvature_kernels.h"
#include "cuda/glue_backend.h"
#include "glue/curvature_args.h"
#include "glue/dtype_dispatch.h"

namespace bdx::cuda {
namespace {

template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

void compute_conv_diag_ggn(const glue::CurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  const PatchGeometry& g = args.geometry;
  // One accumulator per input pixel of one image: the batch is reduced before the taps.
  const at::Tensor square_sum = at::empty({g.channels * g.plane()}, args.out.options());
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ggn", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_conv_diag_ggn<T>(data<T>(args.phi), g, square_sum.data_ptr<Acc>(),
                                         args.out.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_conv_diag_ef(const glue::CurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ef", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_conv_diag_ef<T>(data<T>(args.phi), data<T>(args.residual),
                                        args.geometry, args.out.size(0), args.out.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_conv_patch_gram(const glue::CurvatureArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_patch_gram", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_conv_patch_gram<T>(data<T>(args.phi), args.geometry,
                                           args.out.data_ptr<Acc>(), scope.stream()));
  });
}

}  // namespace
}  // namespace bdx::cuda

TORCH_LIBRARY_IMPL(BDX_GLUE_LIBRARY, BDX_GLUE_DISPATCH_KEY, m) {
  m.impl("conv_diag_ggn", &bdx::glue::conv_diag_ggn<&bdx::cuda::compute_conv_diag_ggn>);
  m.impl("conv_diag_ef", &bdx::glue::conv_diag_ef<&bdx::cuda::compute_conv_diag_ef>);
  m.impl("conv_patch_gram", &bdx::glue::conv_patch_gram<&bdx::cuda::compute_conv_patch_gram>);
}

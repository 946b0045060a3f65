// CUDA glue of the head ops: checks, device guard, stream, launch. Compiled by the host compiler
// twice: against the real CUDA runtime (torch.ops.bayesdiff_ext.*, CUDA key) and, with
// BDX_CUDA_EMULATION, against the host emulation (torch.ops.bayesdiff_ext_emu.*, CPU key).
#include <torch/library.h>

#include "cuda/glue_backend.h"
#include "cuda/head_kernels.h"
#include "glue/dtype_dispatch.h"
#include "glue/head_args.h"
#include "glue/tensor_checks.h"

namespace bdx::cuda {
namespace {

void compute_conv_head_mean_var(const glue::ConvHeadMeanVarArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_head_mean_var", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_conv_head_mean_var<T>(
        glue::data_or_null<T>(args.phi), args.weight.const_data_ptr<Acc>(), args.weight_var.const_data_ptr<Acc>(),
        glue::data_or_null<Acc>(args.bias), glue::data_or_null<Acc>(args.bias_var), args.geometry,
        args.mean.data_ptr<Acc>(), args.var.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_linear_head_mean_var(const glue::LinearHeadMeanVarArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_head_mean_var", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_linear_head_mean_var<T>(
        glue::data_or_null<T>(args.phi), args.weight.const_data_ptr<Acc>(), args.weight_var.const_data_ptr<Acc>(),
        glue::data_or_null<Acc>(args.bias), glue::data_or_null<Acc>(args.bias_var), args.rows, args.features,
        args.out_features, args.mean.data_ptr<Acc>(), args.var.data_ptr<Acc>(), scope.stream()));
  });
}

void compute_conv_head_var_factored(const glue::ConvHeadVarFactoredArgs& args) {
  const DeviceScope scope(args.phi);
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_head_var_factored", [&] {
    using Acc = acc_t<T>;
    check_launch(launch_conv_head_var_factored<T>(
        glue::data_or_null<T>(args.phi), args.proj_weight.const_data_ptr<Acc>(), glue::data_or_null<Acc>(args.proj_bias),
        args.mix.const_data_ptr<Acc>(), glue::data_or_null<Acc>(args.bias_var), args.geometry, args.channels,
        args.var.data_ptr<Acc>(), scope.stream()));
  });
}

}  // namespace
}  // namespace bdx::cuda

TORCH_LIBRARY_IMPL(BDX_GLUE_LIBRARY, BDX_GLUE_DISPATCH_KEY, m) {
  m.impl("conv_head_mean_var", &bdx::glue::conv_head_mean_var<&bdx::cuda::compute_conv_head_mean_var>);
  m.impl("linear_head_mean_var", &bdx::glue::linear_head_mean_var<&bdx::cuda::compute_linear_head_mean_var>);
  m.impl("conv_head_var_factored", &bdx::glue::conv_head_var_factored<&bdx::cuda::compute_conv_head_var_factored>);
}

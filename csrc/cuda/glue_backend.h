// What differs between the real CUDA glue and its host emulation: the library and dispatch key the
// kernels register under, the device guard and stream, and launch-error checking.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(BDX_CUDA_EMULATION)

#include "kernels/platform.h"

#define BDX_GLUE_LIBRARY bayesdiff_ext_emu
#define BDX_GLUE_DISPATCH_KEY CPU

namespace bdx::cuda {
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "CUDA emulation runs on CPU tensors, got ", t.device());
  }
  cudaStream_t stream() const { return nullptr; }
};
inline void check_launch(cudaError_t) {}
}  // namespace bdx::cuda

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define BDX_GLUE_LIBRARY bayesdiff_ext
#define BDX_GLUE_DISPATCH_KEY CUDA

namespace bdx::cuda {
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  c10::cuda::CUDAGuard guard;
};
inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }
}  // namespace bdx::cuda

#endif

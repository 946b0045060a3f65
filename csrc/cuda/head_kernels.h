// Launchers of the head-op CUDA kernels (docs/MATH.md §1.1). Torch-free: the glue passes raw pointers.
// phi is in its storage type T; the parameters are already in the accumulation type; optional
// parameters (bias, bias_var, proj_bias) may be null and then count as zero.
#pragma once

#include "kernels/head_math.h"

#if !defined(BDX_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

namespace bdx::cuda {

// phi (B, C_in, H, W); weight/weight_var (C, C_in/groups, kh, kw); mean/var (B, C, OH, OW).
template <typename T>
cudaError_t launch_conv_head_mean_var(const T* phi, const acc_t<T>* weight, const acc_t<T>* weight_var,
                                      const acc_t<T>* bias, const acc_t<T>* bias_var, const ConvGeometry& geometry,
                                      acc_t<T>* mean, acc_t<T>* var, cudaStream_t stream);

// phi (rows, features); weight/weight_var (out_features, features); mean/var (rows, out_features).
template <typename T>
cudaError_t launch_linear_head_mean_var(const T* phi, const acc_t<T>* weight, const acc_t<T>* weight_var,
                                        const acc_t<T>* bias, const acc_t<T>* bias_var, int64_t rows,
                                        int64_t features, int64_t out_features, acc_t<T>* mean, acc_t<T>* var,
                                        cudaStream_t stream);

// geometry: the projection conv (out_channels = R); proj_weight (R, C_in, kh, kw); mix (channels, R);
// var (B, channels, OH, OW).
template <typename T>
cudaError_t launch_conv_head_var_factored(const T* phi, const acc_t<T>* proj_weight, const acc_t<T>* proj_bias,
                                          const acc_t<T>* mix, const acc_t<T>* bias_var, const ConvGeometry& geometry,
                                          int64_t channels, acc_t<T>* var, cudaStream_t stream);

}  // namespace bdx::cuda

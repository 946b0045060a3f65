// Launchers of the curvature-accumulator CUDA kernels (docs/MATH.md §1.2). Torch-free: the glue passes raw
// pointers to contiguous tensors and zero-filled outputs.
#pragma once

#include "kernels/curvature_math.h"

#if !defined(BDX_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

namespace bdx::cuda {

// out (C_in·kh·kw) = Σ_{n,p} φ_{n,p}²; `square_sum` is scratch of C_in·H·W accumulators.
template <typename T>
cudaError_t launch_conv_diag_ggn(const T* phi, const PatchGeometry& geometry, acc_t<T>* square_sum, acc_t<T>* out,
                                 cudaStream_t stream);

// out (C·D, zero-filled) += Σ_n (Σ_p r_n[c, p] φ_{n,p})², residual (N, C, P).
template <typename T>
cudaError_t launch_conv_diag_ef(const T* phi, const T* residual, const PatchGeometry& geometry, int64_t out_channels,
                                acc_t<T>* out, cudaStream_t stream);

// gram ((D+1)², zero-filled) += Σ_{n,p} [φ_{n,p}; 1][φ_{n,p}; 1]ᵀ.
template <typename T>
cudaError_t launch_conv_patch_gram(const T* phi, const PatchGeometry& geometry, acc_t<T>* gram, cudaStream_t stream);

}  // namespace bdx::cuda

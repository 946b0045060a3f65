// Launchers of the Linear-head fitting-sum CUDA kernels (docs/MATH.md §1.2). Torch-free: the glue
// passes raw pointers to contiguous tensors and zero-filled float64 outputs.
#pragma once

#include "kernels/linear_curvature_math.h"

#if !defined(BDX_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

namespace bdx::cuda {

// out (D) += Σ_rows φ².
template <typename T>
cudaError_t launch_linear_diag_ggn(const T* phi, const TokenGeometry& geometry, double* out, cudaStream_t stream);

// out (C·(D+1)) += Σ_n (Σ_t r[n, t, c] [φ[n, t]; 1][j])².
template <typename T>
cudaError_t launch_linear_diag_ef(const T* phi, const T* residual, const TokenGeometry& geometry, double* out,
                                  cudaStream_t stream);

// gram ((D+1)²) += Σ_rows [φ; 1][φ; 1]ᵀ. Defined in curvature_kernels.cu: a Linear head is a 1×1
// convolution on rows, and the patch Gram's kernel serves it unchanged.
template <typename T>
cudaError_t launch_linear_gram(const T* phi, const TokenGeometry& geometry, double* gram, cudaStream_t stream);

}  // namespace bdx::cuda

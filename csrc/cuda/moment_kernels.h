// Launchers of the moment-recurrence CUDA kernels. Torch-free: the glue passes raw pointers.
#pragma once

#include "kernels/moment_math.h"

#if !defined(BDX_CUDA_EMULATION)
#include <cuda_runtime_api.h>
#endif

namespace bdx::cuda {

// Optional inputs (eps_var, cov_x_eps) may be null and then count as zero.
template <typename T>
cudaError_t launch_moment_step(const T* mean_x, const T* var_x, const T* eps_mean, const T* eps_var,
                               const T* cov_x_eps, MomentCoefficients<acc_t<T>> coefficients, int64_t numel,
                               acc_t<T>* mean_next, acc_t<T>* var_next, cudaStream_t stream);

// x, eps_mean, eps_var: (samples, numel) row-major; eps_var may be null.
template <typename T>
cudaError_t launch_mc_moments(const T* x, const T* eps_mean, const T* eps_var, const T* mean_x, int64_t samples,
                              int64_t numel, acc_t<T>* e_eps, acc_t<T>* var_eps, acc_t<T>* cov_x_eps,
                              cudaStream_t stream);

// mc_moments and moment_step in one pass: x, eps_mean, eps_var as for launch_mc_moments.
template <typename T>
cudaError_t launch_mc_moment_step(const T* x, const T* eps_mean, const T* eps_var, const T* mean_x, const T* var_x,
                                  MomentCoefficients<acc_t<T>> coefficients, int64_t samples, int64_t numel,
                                  acc_t<T>* mean_next, acc_t<T>* var_next, acc_t<T>* var_eps, cudaStream_t stream);

}  // namespace bdx::cuda

// CUDA kernels of the moment recurrence (docs/MATH.md §2). No torch headers: see moment_kernels.h.
#include "cuda/launch_config.h"
#include "cuda/moment_kernels.h"

namespace bdx::cuda {
namespace {

template <typename T>
__global__ void moment_step_kernel(const T* __restrict__ mean_x, const T* __restrict__ var_x,
                                   const T* __restrict__ eps_mean, const T* __restrict__ eps_var,
                                   const T* __restrict__ cov_x_eps, MomentCoefficients<acc_t<T>> coefficients,
                                   int64_t numel, acc_t<T>* __restrict__ mean_next,
                                   acc_t<T>* __restrict__ var_next) {
  using Acc = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const Acc ev = eps_var ? load<Acc>(eps_var, i) : Acc(0);
    const Acc cov = cov_x_eps ? load<Acc>(cov_x_eps, i) : Acc(0);
    moment_step_element(coefficients, load<Acc>(mean_x, i), load<Acc>(var_x, i), load<Acc>(eps_mean, i), ev, cov,
                        &mean_next[i], &var_next[i]);
  }
}

// One element's shifted sums over its S samples (shifts: the given E[x] and the first sample's
// m). Neighbouring threads read neighbouring addresses of each sample's slice, so every pass over
// the stack is coalesced.
template <typename T>
__device__ __forceinline__ McState<acc_t<T>> mc_state(const T* __restrict__ x, const T* __restrict__ eps_mean,
                                                      const T* __restrict__ eps_var, acc_t<T> mean_x_given,
                                                      acc_t<T> eps_first, int64_t samples, int64_t numel,
                                                      int64_t i) {
  using Acc = acc_t<T>;
  McState<Acc> state = mc_init<Acc>();
  for (int64_t s = 0; s < samples; ++s) {
    const int64_t at = s * numel + i;
    const Acc ev = eps_var ? load<Acc>(eps_var, at) : Acc(0);
    mc_accumulate(state, load<Acc>(x, at), load<Acc>(eps_mean, at), ev, mean_x_given, eps_first);
  }
  return state;
}

template <typename T>
__global__ void mc_moments_kernel(const T* __restrict__ x, const T* __restrict__ eps_mean,
                                  const T* __restrict__ eps_var, const T* __restrict__ mean_x, int64_t samples,
                                  int64_t numel, acc_t<T>* __restrict__ e_eps, acc_t<T>* __restrict__ var_eps,
                                  acc_t<T>* __restrict__ cov_x_eps) {
  using Acc = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const Acc mean_x_given = load<Acc>(mean_x, i);
    const Acc eps_first = load<Acc>(eps_mean, i);
    mc_finalize(mc_state(x, eps_mean, eps_var, mean_x_given, eps_first, samples, numel, i),
                Acc(1) / static_cast<Acc>(samples), eps_first, &e_eps[i], &var_eps[i], &cov_x_eps[i]);
  }
}

template <typename T>
__global__ void mc_moment_step_kernel(const T* __restrict__ x, const T* __restrict__ eps_mean,
                                      const T* __restrict__ eps_var, const T* __restrict__ mean_x,
                                      const T* __restrict__ var_x, MomentCoefficients<acc_t<T>> coefficients,
                                      int64_t samples, int64_t numel, acc_t<T>* __restrict__ mean_next,
                                      acc_t<T>* __restrict__ var_next, acc_t<T>* __restrict__ var_eps) {
  using Acc = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const Acc mean_x_given = load<Acc>(mean_x, i);
    const Acc eps_first = load<Acc>(eps_mean, i);
    mc_step_finalize(coefficients, mc_state(x, eps_mean, eps_var, mean_x_given, eps_first, samples, numel, i),
                     Acc(1) / static_cast<Acc>(samples), mean_x_given, eps_first, load<Acc>(var_x, i),
                     &mean_next[i], &var_next[i], &var_eps[i]);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_moment_step(const T* mean_x, const T* var_x, const T* eps_mean, const T* eps_var,
                               const T* cov_x_eps, MomentCoefficients<acc_t<T>> coefficients, int64_t numel,
                               acc_t<T>* mean_next, acc_t<T>* var_next, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  BDX_LAUNCH(moment_step_kernel<T>, blocks_for(numel), kThreadsPerBlock, stream, mean_x, var_x, eps_mean, eps_var,
             cov_x_eps, coefficients, numel, mean_next, var_next);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mc_moments(const T* x, const T* eps_mean, const T* eps_var, const T* mean_x, int64_t samples,
                              int64_t numel, acc_t<T>* e_eps, acc_t<T>* var_eps, acc_t<T>* cov_x_eps,
                              cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  BDX_LAUNCH(mc_moments_kernel<T>, blocks_for(numel), kThreadsPerBlock, stream, x, eps_mean, eps_var, mean_x,
             samples, numel, e_eps, var_eps, cov_x_eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mc_moment_step(const T* x, const T* eps_mean, const T* eps_var, const T* mean_x, const T* var_x,
                                  MomentCoefficients<acc_t<T>> coefficients, int64_t samples, int64_t numel,
                                  acc_t<T>* mean_next, acc_t<T>* var_next, acc_t<T>* var_eps, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  BDX_LAUNCH(mc_moment_step_kernel<T>, blocks_for(numel), kThreadsPerBlock, stream, x, eps_mean, eps_var, mean_x,
             var_x, coefficients, samples, numel, mean_next, var_next, var_eps);
  return cudaGetLastError();
}

#define BDX_INSTANTIATE(T)                                                                                     \
  template cudaError_t launch_moment_step<T>(const T*, const T*, const T*, const T*, const T*,                 \
                                             MomentCoefficients<acc_t<T>>, int64_t, acc_t<T>*, acc_t<T>*,      \
                                             cudaStream_t);                                                    \
  template cudaError_t launch_mc_moments<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, acc_t<T>*, \
                                            acc_t<T>*, acc_t<T>*, cudaStream_t);                               \
  template cudaError_t launch_mc_moment_step<T>(const T*, const T*, const T*, const T*, const T*,              \
                                                MomentCoefficients<acc_t<T>>, int64_t, int64_t, acc_t<T>*,     \
                                                acc_t<T>*, acc_t<T>*, cudaStream_t);
BDX_INSTANTIATE(float)
BDX_INSTANTIATE(double)
BDX_INSTANTIATE(half_t)
BDX_INSTANTIATE(bfloat16_t)
#undef BDX_INSTANTIATE

}  // namespace bdx::cuda

// CUDA kernels of the head ops (docs/MATH.md §1.1). No torch headers: see head_kernels.h.
//
// Threads are laid out with the output pixel fastest, so a warp reads neighbouring φ values and
// writes neighbouring outputs, while every thread of the warp reads the same weight (a broadcast
// through the read-only cache).
#include "cuda/head_kernels.h"
#include "cuda/launch_config.h"

namespace bdx::cuda {
namespace {

// Output channels whose accumulators one thread keeps in registers.
constexpr int kChannelChunk = 8;
// Projections q_r·φ_p one thread keeps in registers while it walks the patch.
constexpr int kRankChunk = 16;
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename Acc>
__device__ __forceinline__ Acc optional_value(const Acc* p, int64_t i) {
  return p ? __ldg(p + i) : Acc(0);
}

// One thread: one output pixel and up to kChannelChunk output channels of one group.
template <typename T>
__global__ void conv_head_mean_var_kernel(const T* __restrict__ phi, const acc_t<T>* __restrict__ weight,
                                          const acc_t<T>* __restrict__ weight_var, const acc_t<T>* __restrict__ bias,
                                          const acc_t<T>* __restrict__ bias_var, ConvGeometry g,
                                          int64_t chunks_per_group, int64_t total, acc_t<T>* __restrict__ mean,
                                          acc_t<T>* __restrict__ var) {
  using Acc = acc_t<T>;
  const int64_t pixels = g.out_pixels();
  const int64_t taps = g.taps_per_channel();
  const int64_t cin = g.in_channels_per_group();
  const int64_t cout = g.out_channels_per_group();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t p = i % pixels;
    const int64_t chunk = (i / pixels) % chunks_per_group;
    const int64_t group = (i / (pixels * chunks_per_group)) % g.groups;
    const int64_t b = i / (pixels * chunks_per_group * g.groups);
    const int64_t oh = p / g.out_w;
    const int64_t ow = p % g.out_w;
    const int64_t c0 = group * cout + chunk * kChannelChunk;
    const int64_t count = cout - chunk * kChannelChunk < kChannelChunk ? cout - chunk * kChannelChunk : kChannelChunk;

    Acc m[kChannelChunk];
    Acc v[kChannelChunk];
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      m[k] = k < count ? optional_value(bias, c0 + k) : Acc(0);
      v[k] = k < count ? optional_value(bias_var, c0 + k) : Acc(0);
    }
    const T* group_phi = phi + (b * g.in_channels + group * cin) * g.in_pixels();
    const Acc* w = weight + c0 * taps;
    const Acc* wv = weight_var + c0 * taps;
    for (int64_t ci = 0; ci < cin; ++ci) {
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
        if (!in_range(ih, g.in_h)) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
          if (!in_range(iw, g.in_w)) continue;
          const Acc x = load<Acc>(group_phi, (ci * g.in_h + ih) * g.in_w + iw);
          const Acc x_squared = x * x;
          const int64_t tap = (ci * g.kernel_h + kh) * g.kernel_w + kw;
#pragma unroll
          for (int k = 0; k < kChannelChunk; ++k) {
            if (k < count) {
              accumulate_mean_var(x, x_squared, __ldg(w + k * taps + tap), __ldg(wv + k * taps + tap), m[k], v[k]);
            }
          }
        }
      }
    }
    const int64_t out = (b * g.out_channels + c0) * pixels + p;
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      if (k < count) {
        mean[out + k * pixels] = m[k];
        var[out + k * pixels] = clamp_variance(v[k]);
      }
    }
  }
}

// One warp: one row of phi and up to kChannelChunk outputs. The lanes stride over the features
// (coalesced reads of phi and of the weight rows), then the partial sums meet by shuffles.
template <typename T>
__global__ void linear_head_mean_var_kernel(const T* __restrict__ phi, const acc_t<T>* __restrict__ weight,
                                            const acc_t<T>* __restrict__ weight_var,
                                            const acc_t<T>* __restrict__ bias, const acc_t<T>* __restrict__ bias_var,
                                            int64_t features, int64_t out_features, int64_t chunks, int64_t total,
                                            acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ var) {
  using Acc = acc_t<T>;
  const unsigned lane = threadIdx.x % warpSize;
  const int64_t warps_per_block = blockDim.x / warpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  // The loop bound is uniform across the warp, so every lane reaches every shuffle.
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / warpSize; item < total;
       item += warp_stride) {
    const int64_t row = item / chunks;
    const int64_t c0 = (item % chunks) * kChannelChunk;
    const int64_t count = out_features - c0 < kChannelChunk ? out_features - c0 : kChannelChunk;
    Acc m[kChannelChunk];
    Acc v[kChannelChunk];
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      m[k] = Acc(0);
      v[k] = Acc(0);
    }
    const T* x_row = phi + row * features;
    for (int64_t d = lane; d < features; d += warpSize) {
      const Acc x = load<Acc>(x_row, d);
      const Acc x_squared = x * x;
#pragma unroll
      for (int k = 0; k < kChannelChunk; ++k) {
        if (k < count) {
          const int64_t at = (c0 + k) * features + d;
          accumulate_mean_var(x, x_squared, __ldg(weight + at), __ldg(weight_var + at), m[k], v[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      for (int offset = warpSize / 2; offset > 0; offset /= 2) {
        m[k] += __shfl_down_sync(kFullWarp, m[k], offset);
        v[k] += __shfl_down_sync(kFullWarp, v[k], offset);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kChannelChunk; ++k) {
        if (k < count) {
          mean[row * out_features + c0 + k] = m[k] + optional_value(bias, c0 + k);
          var[row * out_features + c0 + k] = clamp_variance(v[k] + optional_value(bias_var, c0 + k));
        }
      }
    }
  }
}

// One thread: one output pixel, all C outputs. It walks the R directions kRankChunk at a time
// (each patch value read once per chunk), squares and mixes each chunk into its own outputs in
// global memory (no other thread touches them), so no (B, R, H, W) projection ever exists.
template <typename T>
__global__ void conv_head_var_factored_kernel(const T* __restrict__ phi, const acc_t<T>* __restrict__ proj_weight,
                                              const acc_t<T>* __restrict__ proj_bias,
                                              const acc_t<T>* __restrict__ mix, const acc_t<T>* __restrict__ bias_var,
                                              ConvGeometry g, int64_t channels, int64_t total,
                                              acc_t<T>* __restrict__ var) {
  using Acc = acc_t<T>;
  const int64_t pixels = g.out_pixels();
  const int64_t taps = g.taps_per_channel();
  const int64_t rank = g.out_channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t p = i % pixels;
    const int64_t b = i / pixels;
    const int64_t oh = p / g.out_w;
    const int64_t ow = p % g.out_w;
    const T* image = phi + b * g.in_channels * g.in_pixels();
    Acc* out = var + b * channels * pixels + p;
    for (int64_t c = 0; c < channels; ++c) out[c * pixels] = optional_value(bias_var, c);

    for (int64_t r0 = 0; r0 < rank; r0 += kRankChunk) {
      const int64_t count = rank - r0 < kRankChunk ? rank - r0 : kRankChunk;
      Acc projection[kRankChunk];
#pragma unroll
      for (int k = 0; k < kRankChunk; ++k) projection[k] = k < count ? optional_value(proj_bias, r0 + k) : Acc(0);
      const Acc* directions = proj_weight + r0 * taps;
      for (int64_t ci = 0; ci < g.in_channels; ++ci) {
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
          if (!in_range(ih, g.in_h)) continue;
          for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
            const int64_t iw = conv_input_coordinate(ow, kw, g.stride_w, g.pad_w, g.dilation_w);
            if (!in_range(iw, g.in_w)) continue;
            const Acc x = load<Acc>(image, (ci * g.in_h + ih) * g.in_w + iw);
            const int64_t tap = (ci * g.kernel_h + kh) * g.kernel_w + kw;
#pragma unroll
            for (int k = 0; k < kRankChunk; ++k) {
              if (k < count) projection[k] += __ldg(directions + k * taps + tap) * x;
            }
          }
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        Acc acc = out[c * pixels];
#pragma unroll
        for (int k = 0; k < kRankChunk; ++k) {
          if (k < count) acc = accumulate_squared_projection(acc, __ldg(mix + c * rank + r0 + k), projection[k]);
        }
        out[c * pixels] = acc;
      }
    }
    for (int64_t c = 0; c < channels; ++c) out[c * pixels] = clamp_variance(out[c * pixels]);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename T>
cudaError_t launch_conv_head_mean_var(const T* phi, const acc_t<T>* weight, const acc_t<T>* weight_var,
                                      const acc_t<T>* bias, const acc_t<T>* bias_var, const ConvGeometry& geometry,
                                      acc_t<T>* mean, acc_t<T>* var, cudaStream_t stream) {
  const int64_t chunks = ceil_div(geometry.out_channels_per_group(), kChannelChunk);
  const int64_t total = geometry.batch * geometry.groups * chunks * geometry.out_pixels();
  if (total == 0) return cudaSuccess;
  BDX_LAUNCH(conv_head_mean_var_kernel<T>, blocks_for(total), kThreadsPerBlock, stream, phi, weight, weight_var, bias,
             bias_var, geometry, chunks, total, mean, var);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_linear_head_mean_var(const T* phi, const acc_t<T>* weight, const acc_t<T>* weight_var,
                                        const acc_t<T>* bias, const acc_t<T>* bias_var, int64_t rows,
                                        int64_t features, int64_t out_features, acc_t<T>* mean, acc_t<T>* var,
                                        cudaStream_t stream) {
  const int64_t chunks = ceil_div(out_features, kChannelChunk);
  const int64_t total = rows * chunks;
  if (total == 0) return cudaSuccess;
  BDX_LAUNCH(linear_head_mean_var_kernel<T>, blocks_for(total * 32), kThreadsPerBlock, stream, phi, weight,
             weight_var, bias, bias_var, features, out_features, chunks, total, mean, var);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_conv_head_var_factored(const T* phi, const acc_t<T>* proj_weight, const acc_t<T>* proj_bias,
                                          const acc_t<T>* mix, const acc_t<T>* bias_var, const ConvGeometry& geometry,
                                          int64_t channels, acc_t<T>* var, cudaStream_t stream) {
  const int64_t total = geometry.batch * geometry.out_pixels();
  if (total == 0 || channels == 0) return cudaSuccess;
  BDX_LAUNCH(conv_head_var_factored_kernel<T>, blocks_for(total), kThreadsPerBlock, stream, phi, proj_weight,
             proj_bias, mix, bias_var, geometry, channels, total, var);
  return cudaGetLastError();
}

#define BDX_INSTANTIATE(T)                                                                                        \
  template cudaError_t launch_conv_head_mean_var<T>(const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*,  \
                                                    const acc_t<T>*, const ConvGeometry&, acc_t<T>*, acc_t<T>*,   \
                                                    cudaStream_t);                                                \
  template cudaError_t launch_linear_head_mean_var<T>(const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, \
                                                      const acc_t<T>*, int64_t, int64_t, int64_t, acc_t<T>*,      \
                                                      acc_t<T>*, cudaStream_t);                                   \
  template cudaError_t launch_conv_head_var_factored<T>(const T*, const acc_t<T>*, const acc_t<T>*,               \
                                                        const acc_t<T>*, const acc_t<T>*, const ConvGeometry&,    \
                                                        int64_t, acc_t<T>*, cudaStream_t);
BDX_INSTANTIATE(float)
BDX_INSTANTIATE(double)
BDX_INSTANTIATE(half_t)
BDX_INSTANTIATE(bfloat16_t)
#undef BDX_INSTANTIATE

}  // namespace bdx::cuda

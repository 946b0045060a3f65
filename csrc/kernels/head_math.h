// Math of the Bayesian head ops (docs/MATH.md §1.1), shared by the CPU and CUDA kernels: the geometry of the
// head's convolution and the per-element updates of the closed-form predictive.
//
// Because the head is linear in its weights θ = (W, b), the ε prediction is exactly Gaussian with
//   mean[c,p] = Σ_j W[c,j]·φ_p[j] + b[c]
//   diag posterior:   var[c,p] = Σ_j V_w[c,j]·φ_p[j]² + v_b[c]
//   factored (full GGN, KFAC):  var[c,p] = Σ_r M[c,r]·(q_r·φ_p + β_r)² + v_b[c]
// where φ_p is the receptive-field patch of output pixel p.
#pragma once

#include "kernels/platform.h"
#include "kernels/variance.h"

namespace bdx {

// Shape of a 2-D convolution over an NCHW input; weights are (out_channels, in_channels/groups,
// kernel_h, kernel_w), outputs (batch, out_channels, out_h, out_w), all contiguous.
struct ConvGeometry {
  int64_t batch;
  int64_t in_channels, in_h, in_w;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t groups;

  BDX_HD int64_t in_channels_per_group() const { return in_channels / groups; }
  BDX_HD int64_t out_channels_per_group() const { return out_channels / groups; }
  BDX_HD int64_t out_pixels() const { return out_h * out_w; }
  BDX_HD int64_t in_pixels() const { return in_h * in_w; }
  // Weight entries per output channel (D in docs/MATH.md §1.1 for groups = 1).
  BDX_HD int64_t taps_per_channel() const { return in_channels_per_group() * kernel_h * kernel_w; }
};

// Output extent of a convolution along one axis; 0 when the (dilated) kernel does not fit. The
// room is tested before dividing because C++ division truncates toward zero: a kernel one pixel too
// wide with stride 2 would otherwise get one output pixel.
BDX_HD int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t room = in + 2 * pad - dilation * (kernel - 1) - 1;
  return room < 0 ? 0 : room / stride + 1;
}

// Input coordinate read by output coordinate `out` at kernel tap `tap` (may fall in the padding).
BDX_HD int64_t conv_input_coordinate(int64_t out, int64_t tap, int64_t stride, int64_t pad, int64_t dilation) {
  return out * stride - pad + tap * dilation;
}

BDX_HD bool in_range(int64_t i, int64_t size) { return i >= 0 && i < size; }

// One input value φ (and its square) through one weight of the mean and of the diagonal variance.
// The square is passed in because a kernel reuses it for every output channel.
template <typename Acc>
BDX_HD void accumulate_mean_var(Acc x, Acc x_squared, Acc weight, Acc weight_var, Acc& mean, Acc& var) {
  mean += weight * x;
  var += weight_var * x_squared;
}

// One direction r of a factored posterior: its projection q_r·φ_p + β_r, squared and weighted by
// M[c,r]. With M >= 0 every term is >= 0; the kernels clamp the finished sum (clamp_variance) so
// that a negative M or bias variance never gives a negative output.
template <typename Acc>
BDX_HD Acc accumulate_squared_projection(Acc var, Acc mix, Acc projection) {
  return var + mix * (projection * projection);
}

}  // namespace bdx

// CPU implementation of the head ops (docs/MATH.md §1.1): the per-element math of
// kernels/head_math.h in register-blocked loops of explicit vectors (cpu/simd.h), compiled per ISA
// and picked at run time (the head is compute-bound, so the vector width matters).
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "glue/dtype_dispatch.h"
#include "glue/head_args.h"
#include "glue/tensor_checks.h"
#include "kernels/head_math.h"

namespace bdx::cpu {
namespace {

constexpr int kMaxChannels = 4;

// ---------------------------------------------------------------------------------------------
// conv_head_mean_var: a tile of one vector of output pixels at a time, with the mean and variance
// accumulators of up to kMaxChannels output channels in registers; each φ vector (and its square)
// loaded per kernel tap feeds 2·kChannels multiply-adds. (Two vectors per tile, for more
// independent chains, measured slower: the accumulators no longer fit in the registers.)

template <typename T>
struct DiagConvJob {
  using Acc = acc_t<T>;
  ConvGeometry g;
  const T* phi;
  const Acc* weight;
  const Acc* weight_var;
  const Acc* bias;      // null when absent
  const Acc* bias_var;  // null when absent
  Acc* mean;
  Acc* var;
  int64_t packed_len;  // one zero-padded input row, long enough for the widest tiles' overhang
};

// Input rows [kh_begin, kh_end) of every channel of the group, zero-padded and converted to Acc:
// packed[(ci·KH + kh)·L + j] = φ[ci, ih(kh), j − pad_w], so the tiles need no bounds checks.
template <typename T>
void pack_input_rows(const DiagConvJob<T>& job, const T* group_phi, int64_t oh, int64_t kh_begin, int64_t kh_end,
                     acc_t<T>* packed) {
  using Acc = acc_t<T>;
  const ConvGeometry& g = job.g;
  const int64_t len = job.packed_len;
  const int64_t copy_end = std::min(len, g.pad_w + g.in_w);  // packed j holds iw = j − pad_w
  for (int64_t ci = 0; ci < g.in_channels_per_group(); ++ci) {
    for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
      const int64_t ih = conv_input_coordinate(oh, kh, g.stride_h, g.pad_h, g.dilation_h);
      const T* src = group_phi + (ci * g.in_h + ih) * g.in_w;
      Acc* dst = packed + (ci * g.kernel_h + kh) * len;
      for (int64_t j = 0; j < std::min(len, g.pad_w); ++j) dst[j] = Acc(0);
      for (int64_t j = g.pad_w; j < copy_end; ++j) dst[j] = load<Acc>(src, j - g.pad_w);
      for (int64_t j = copy_end; j < len; ++j) dst[j] = Acc(0);
    }
  }
}

template <int kBytes, typename T, int kChannels, bool kUnitStride>
void diag_tile(const DiagConvJob<T>& job, const acc_t<T>* packed, int64_t kh_begin, int64_t kh_end, int64_t c0,
               int64_t out_offset, int64_t ow0, int64_t count) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  const ConvGeometry& g = job.g;
  const int64_t taps = g.taps_per_channel();
  const int64_t stride = g.stride_w;
  V mean[kChannels];
  V var[kChannels];
  for (int k = 0; k < kChannels; ++k) {
    mean[k] = broadcast<kBytes>(job.bias ? job.bias[c0 + k] : Acc(0));
    var[k] = broadcast<kBytes>(job.bias_var ? job.bias_var[c0 + k] : Acc(0));
  }
  const Acc* w = job.weight + c0 * taps;
  const Acc* wv = job.weight_var + c0 * taps;
  for (int64_t ci = 0; ci < g.in_channels_per_group(); ++ci) {
    for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
      const int64_t row = ci * g.kernel_h + kh;
      const Acc* src_row = packed + row * job.packed_len + ow0 * stride;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t tap = row * g.kernel_w + kw;
        const V x = load_lanes<kBytes, kUnitStride>(src_row + kw * g.dilation_w, stride);
        const V x_squared = x * x;
        for (int k = 0; k < kChannels; ++k) {
          accumulate_mean_var(x, x_squared, broadcast<kBytes>(w[k * taps + tap]), broadcast<kBytes>(wv[k * taps + tap]),
                              mean[k], var[k]);
        }
      }
    }
  }
  const int64_t plane = g.out_pixels();
  for (int k = 0; k < kChannels; ++k) {
    Acc* mean_out = job.mean + out_offset + k * plane + ow0;
    Acc* var_out = job.var + out_offset + k * plane + ow0;
    const V clamped = clamp_variance(var[k]);
    for (int64_t t = 0; t < count; ++t) {
      mean_out[t] = mean[k][t];
      var_out[t] = clamped[t];
    }
  }
}

template <int kBytes, typename T, bool kUnitStride>
void diag_tile_channels(int channels, const DiagConvJob<T>& job, const acc_t<T>* packed, int64_t kh_begin,
                        int64_t kh_end, int64_t c0, int64_t out_offset, int64_t ow0, int64_t count) {
  switch (channels) {
    case 1: return diag_tile<kBytes, T, 1, kUnitStride>(job, packed, kh_begin, kh_end, c0, out_offset, ow0, count);
    case 2: return diag_tile<kBytes, T, 2, kUnitStride>(job, packed, kh_begin, kh_end, c0, out_offset, ow0, count);
    case 3: return diag_tile<kBytes, T, 3, kUnitStride>(job, packed, kh_begin, kh_end, c0, out_offset, ow0, count);
    default:
      return diag_tile<kBytes, T, kMaxChannels, kUnitStride>(job, packed, kh_begin, kh_end, c0, out_offset, ow0,
                                                             count);
  }
}

// One output row (b, oh) of every channel.
template <int kBytes, typename T>
void diag_output_row(const DiagConvJob<T>* job_ptr, int64_t row, acc_t<T>* packed) {
  const DiagConvJob<T>& job = *job_ptr;
  const ConvGeometry& g = job.g;
  const int64_t b = row / g.out_h;
  const int64_t oh = row % g.out_h;
  // ih is increasing in kh, so the taps that land inside the image form one range.
  int64_t kh_begin = 0;
  while (kh_begin < g.kernel_h &&
         !in_range(conv_input_coordinate(oh, kh_begin, g.stride_h, g.pad_h, g.dilation_h), g.in_h)) {
    ++kh_begin;
  }
  int64_t kh_end = kh_begin;
  while (kh_end < g.kernel_h && in_range(conv_input_coordinate(oh, kh_end, g.stride_h, g.pad_h, g.dilation_h), g.in_h)) {
    ++kh_end;
  }
  const int64_t cin = g.in_channels_per_group();
  const int64_t cout = g.out_channels_per_group();
  for (int64_t group = 0; group < g.groups; ++group) {
    const T* group_phi = job.phi + (b * g.in_channels + group * cin) * g.in_pixels();
    pack_input_rows(job, group_phi, oh, kh_begin, kh_end, packed);
    for (int64_t c = 0; c < cout; c += kMaxChannels) {
      const int64_t c0 = group * cout + c;
      const int channels = static_cast<int>(std::min<int64_t>(kMaxChannels, cout - c));
      const int64_t out_offset = (b * g.out_channels + c0) * g.out_pixels() + oh * g.out_w;
      constexpr int64_t kTile = kLanes<acc_t<T>, kBytes>;
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += kTile) {
        const int64_t count = std::min<int64_t>(kTile, g.out_w - ow0);
        if (g.stride_w == 1) {
          diag_tile_channels<kBytes, T, true>(channels, job, packed, kh_begin, kh_end, c0, out_offset, ow0, count);
        } else {
          diag_tile_channels<kBytes, T, false>(channels, job, packed, kh_begin, kh_end, c0, out_offset, ow0, count);
        }
      }
    }
  }
}

struct DiagOutputRow {
  BDX_ISA_VARIANTS(diag_output_row)
};

void compute_conv_head_mean_var(const glue::ConvHeadMeanVarArgs& args) {
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_head_mean_var", [&] {
    using Acc = acc_t<T>;
    const ConvGeometry& g = args.geometry;
    DiagConvJob<T> job{g,
                       glue::data_or_null<T>(args.phi),
                       args.weight.const_data_ptr<Acc>(),
                       args.weight_var.const_data_ptr<Acc>(),
                       glue::data_or_null<Acc>(args.bias),
                       glue::data_or_null<Acc>(args.bias_var),
                       args.mean.data_ptr<Acc>(),
                       args.var.data_ptr<Acc>(),
                       0};
    constexpr int64_t kWidestTile = kLanes<Acc, kWidestVectorBytes>;
    const int64_t widest_tiles = (g.out_w + kWidestTile - 1) / kWidestTile;
    job.packed_len = (widest_tiles * kWidestTile - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1;
    const int64_t packed_size = g.in_channels_per_group() * g.kernel_h * job.packed_len;
    const int64_t rows = g.batch * g.out_h;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.out_w * g.taps_per_channel()));
    const Isa isa = cpu_isa();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<Acc> packed(packed_size);
      for (int64_t row = begin; row < end; ++row) DiagOutputRow::run(isa, &job, row, packed.data());
    });
  });
}

// ---------------------------------------------------------------------------------------------
// linear_head_mean_var: per token, dot products over D a vector at a time (one partial sum per
// lane, reduced at the end), for up to kMaxChannels outputs per pass over the token's features.

template <typename T>
struct LinearJob {
  using Acc = acc_t<T>;
  const T* phi;
  const Acc* weight;
  const Acc* weight_var;
  const Acc* bias;
  const Acc* bias_var;
  int64_t features, out_features;
  Acc* mean;
  Acc* var;
};

template <int kBytes, typename T, int kChannels>
void linear_channels(const LinearJob<T>& job, const T* x_row, int64_t c0, acc_t<T>* mean_row, acc_t<T>* var_row) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  constexpr int kLanes = kBytes / sizeof(Acc);
  const int64_t n = job.features;
  const Acc* w = job.weight + c0 * n;
  const Acc* wv = job.weight_var + c0 * n;
  V mean[kChannels];
  V var[kChannels];
  for (int k = 0; k < kChannels; ++k) mean[k] = var[k] = V{};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    const V x = load_converted<kBytes>(x_row + d);
    const V x_squared = x * x;
    for (int k = 0; k < kChannels; ++k) {
      accumulate_mean_var(x, x_squared, load_lanes<kBytes, true>(w + k * n + d, 1),
                          load_lanes<kBytes, true>(wv + k * n + d, 1), mean[k], var[k]);
    }
  }
  for (int k = 0; k < kChannels; ++k) {
    Acc m = job.bias ? job.bias[c0 + k] : Acc(0);
    Acc v = job.bias_var ? job.bias_var[c0 + k] : Acc(0);
    for (int t = 0; t < kLanes; ++t) {
      m += mean[k][t];
      v += var[k][t];
    }
    for (int64_t j = d; j < n; ++j) {
      const Acc x = load<Acc>(x_row, j);
      accumulate_mean_var(x, x * x, w[k * n + j], wv[k * n + j], m, v);
    }
    mean_row[c0 + k] = m;
    var_row[c0 + k] = clamp_variance(v);
  }
}

template <int kBytes, typename T>
void linear_row(const LinearJob<T>* job_ptr, int64_t row) {
  const LinearJob<T>& job = *job_ptr;
  const T* x_row = job.phi + row * job.features;
  auto* mean_row = job.mean + row * job.out_features;
  auto* var_row = job.var + row * job.out_features;
  for (int64_t c = 0; c < job.out_features; c += kMaxChannels) {
    switch (std::min<int64_t>(kMaxChannels, job.out_features - c)) {
      case 1: linear_channels<kBytes, T, 1>(job, x_row, c, mean_row, var_row); break;
      case 2: linear_channels<kBytes, T, 2>(job, x_row, c, mean_row, var_row); break;
      case 3: linear_channels<kBytes, T, 3>(job, x_row, c, mean_row, var_row); break;
      default: linear_channels<kBytes, T, kMaxChannels>(job, x_row, c, mean_row, var_row); break;
    }
  }
}

struct LinearRow {
  BDX_ISA_VARIANTS(linear_row)
};

// Wide heads (transformers: C = 32..64 outputs of D = 1k..3k features) are two GEMMs, mean = φ·Wᵀ + b
// and var = φ²·Vᵀ + v, left to BLAS on tiles of rows: a tile of φ (and its square, formed here) stays
// in the L2 cache between the two products, so φ is read from memory once and φ² never exists
// whole. Narrow heads (a few outputs) are bound by reading φ; the register kernel above reads it
// once for every kMaxChannels outputs and beats BLAS there.
constexpr int64_t kLinearBlasMinOutputs = 16;
constexpr int64_t kLinearTileBytes = int64_t(512) << 10;

// φ rows converted to Acc (`converted`, skipped when null because φ already is Acc) and squared.
template <int kBytes, typename T>
void convert_and_square(const T* src, int64_t n, acc_t<T>* converted, acc_t<T>* squared) {
  using Acc = acc_t<T>;
  constexpr int kL = kLanes<Acc, kBytes>;
  int64_t i = 0;
  for (; i + kL <= n; i += kL) {
    const auto x = load_converted<kBytes>(src + i);
    if (converted) store_lanes<kBytes>(converted + i, x);
    store_lanes<kBytes>(squared + i, x * x);
  }
  for (; i < n; ++i) {
    const Acc x = load<Acc>(src, i);
    if (converted) converted[i] = x;
    squared[i] = x * x;
  }
}

struct ConvertAndSquare {
  BDX_ISA_VARIANTS(convert_and_square)
};

template <typename T>
void linear_head_blas(const glue::LinearHeadMeanVarArgs& args) {
  using Acc = acc_t<T>;
  constexpr bool kConvert = !std::is_same_v<T, Acc>;
  const int64_t features = args.features;
  const int64_t tile_rows =
      std::clamp<int64_t>(kLinearTileBytes / std::max<int64_t>(1, features * int64_t(sizeof(Acc))), 1, args.rows);
  const int64_t tiles = (args.rows + tile_rows - 1) / tile_rows;
  const auto phi = args.phi.view({args.rows, features});
  const auto mean = args.mean.view({args.rows, args.out_features});
  const auto var = args.var.view({args.rows, args.out_features});
  const auto weight_t = args.weight.t();
  const auto weight_var_t = args.weight_var.t();
  const Isa isa = cpu_isa();
  // Each thread owns a contiguous run of tiles; BLAS runs single-threaded inside the region.
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const auto options = args.mean.options();
    at::Tensor squared = at::empty({tile_rows, features}, options);
    at::Tensor converted = kConvert ? at::empty({tile_rows, features}, options) : at::Tensor();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * tile_rows;
      const int64_t n = std::min(tile_rows, args.rows - r0);
      ConvertAndSquare::run(isa, glue::data_or_null<T>(args.phi) + r0 * features, n * features,
                            kConvert ? converted.data_ptr<Acc>() : nullptr, squared.data_ptr<Acc>());
      const auto x = kConvert ? converted.narrow(0, 0, n) : phi.narrow(0, r0, n);
      auto mean_rows = mean.narrow(0, r0, n);
      auto var_rows = var.narrow(0, r0, n);
      if (args.bias.defined()) {
        at::addmm_out(mean_rows, args.bias, x, weight_t);
      } else {
        at::mm_out(mean_rows, x, weight_t);
      }
      if (args.bias_var.defined()) {
        at::addmm_out(var_rows, args.bias_var, squared.narrow(0, 0, n), weight_var_t);
      } else {
        at::mm_out(var_rows, squared.narrow(0, 0, n), weight_var_t);
      }
      var_rows.clamp_min_(0);  // clamp_variance's rule (kernels/variance.h); NaN stays NaN
    }
  });
}

void compute_linear_head_mean_var(const glue::LinearHeadMeanVarArgs& args) {
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_head_mean_var", [&] {
    using Acc = acc_t<T>;
    if (args.out_features >= kLinearBlasMinOutputs) return linear_head_blas<T>(args);
    const LinearJob<T> job{glue::data_or_null<T>(args.phi),
                           args.weight.const_data_ptr<Acc>(),
                           args.weight_var.const_data_ptr<Acc>(),
                           glue::data_or_null<Acc>(args.bias),
                           glue::data_or_null<Acc>(args.bias_var),
                           args.features,
                           args.out_features,
                           args.mean.data_ptr<Acc>(),
                           args.var.data_ptr<Acc>()};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, args.features * args.out_features));
    const Isa isa = cpu_isa();
    at::parallel_for(0, args.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) LinearRow::run(isa, &job, row);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// conv_head_var_factored: tiles of whole output rows of one image. A tile's projection onto the R
// directions (the cost of the op: R·D per pixel, so it is left to BLAS or oneDNN: its patches
// (D × P) through one GEMM, or the convolution of its input rows) is squared and mixed into the C
// outputs; the (R × P) projection of one tile (and its patches) is all that is ever held.

// Whole output rows per tile, as many as fit this budget for the tile's buffers (with MKL, tiles of
// 256 pixels ran 1.7× slower than 4096; the patches path now splits a tile into narrower bands for
// oneDNN's matmul), but at most kFactoredMaxTilePixels.
constexpr int64_t kFactoredTileBytes = int64_t(32) << 20;
constexpr int64_t kFactoredMaxTilePixels = 4096;

// The tile size for `total` units in tiles of at most `most`, with the units spread evenly over
// the fewest tiles: a short last tile (e.g. 4096 rows in 2730 + 1366, or 128 image rows in 9×14 + 2)
// runs its GEMM far below BLAS's speed on the others.
int64_t even_tile(int64_t total, int64_t most) {
  const int64_t tiles = (total + most - 1) / most;
  return (total + tiles - 1) / tiles;
}

// The projection (1, R, rows, out_w) of output rows [oh0, oh0 + rows) of image b: the convolution
// of the input rows those outputs see (zero rows where they reach into the vertical padding).
at::Tensor project_rows(const glue::ConvHeadVarFactoredArgs& args, int64_t b, int64_t oh0, int64_t rows) {
  const ConvGeometry& g = args.geometry;
  const int64_t lo = oh0 * g.stride_h - g.pad_h;
  const int64_t hi = (oh0 + rows - 1) * g.stride_h - g.pad_h + (g.kernel_h - 1) * g.dilation_h + 1;
  const int64_t first = std::clamp<int64_t>(lo, 0, g.in_h);
  const int64_t last = std::clamp<int64_t>(hi, first, g.in_h);
  at::Tensor input = args.phi.narrow(0, b, 1).narrow(2, first, last - first).to(args.var.scalar_type());
  if (first - lo > 0 || hi - last > 0) input = at::constant_pad_nd(input, {0, 0, first - lo, hi - last});
  const std::vector<int64_t> stride{g.stride_h, g.stride_w}, padding{0, g.pad_w}, dilation{g.dilation_h, g.dilation_w};
  return at::conv2d(input, args.proj_weight, args.proj_bias, stride, padding, dilation);
}

template <typename T>
void gather_patches(const ConvGeometry& g, const T* image, int64_t oh0, int64_t rows, acc_t<T>* patches) {
  using Acc = acc_t<T>;
  const int64_t pixels = rows * g.out_w;
  at::parallel_for(0, g.taps_per_channel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t tap = begin; tap < end; ++tap) {
      const int64_t kw = tap % g.kernel_w;
      const int64_t kh = (tap / g.kernel_w) % g.kernel_h;
      const int64_t ci = tap / (g.kernel_w * g.kernel_h);
      const T* plane = image + ci * g.in_pixels();
      Acc* dst = patches + tap * pixels;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t ih = conv_input_coordinate(oh0 + r, kh, g.stride_h, g.pad_h, g.dilation_h);
        Acc* dst_row = dst + r * g.out_w;
        if (!in_range(ih, g.in_h)) {
          std::fill(dst_row, dst_row + g.out_w, Acc(0));
          continue;
        }
        // Zeros where the tap falls in the padding, a branch-free (for stride 1, contiguous) copy between.
        const int64_t offset = kw * g.dilation_w - g.pad_w;  // iw = ow·stride + offset
        const int64_t first = std::clamp<int64_t>((-offset + g.stride_w - 1) / g.stride_w, 0, g.out_w);
        const int64_t span = g.in_w - 1 - offset;  // the last valid ow is span / stride, if span >= 0
        const int64_t last = span < 0 ? first : std::clamp<int64_t>(span / g.stride_w + 1, first, g.out_w);
        const T* src = plane + ih * g.in_w;
        std::fill(dst_row, dst_row + first, Acc(0));
        for (int64_t ow = first; ow < last; ++ow) dst_row[ow] = load<Acc>(src, ow * g.stride_w + offset);
        std::fill(dst_row + last, dst_row + g.out_w, Acc(0));
      }
    }
  });
}

// Chunks of pixels small enough that the C output rows stay in L1 while the R projection rows
// stream through once each.
template <typename Acc>
void mix_squared_projections(const Acc* projection, const Acc* proj_bias, int64_t rank, int64_t pixels,
                             const Acc* mix, const Acc* bias_var, int64_t channels, int64_t plane, Acc* out) {
  at::parallel_for(0, pixels, 512, [&](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < channels; ++c) {
      const Acc bv = bias_var ? bias_var[c] : Acc(0);
      for (int64_t p = begin; p < end; ++p) out[c * plane + p] = bv;
    }
    for (int64_t r = 0; r < rank; ++r) {
      const Acc* proj = projection + r * pixels;
      const Acc beta = proj_bias ? proj_bias[r] : Acc(0);
      for (int64_t c = 0; c < channels; ++c) {
        const Acc m = mix[c * rank + r];
        Acc* out_c = out + c * plane;
        for (int64_t p = begin; p < end; ++p) out_c[p] = accumulate_squared_projection(out_c[p], m, proj[p] + beta);
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t p = begin; p < end; ++p) out[c * plane + p] = clamp_variance(out[c * plane + p]);
    }
  });
}

// A Linear head reaches this op as a 1×1 convolution of rows (B, D, 1, 1) (posterior/head_ops.py):
// one pixel per "image", so tiles run across images, and both steps are GEMMs on a tile of rows,
// projection (R × n) = Q·φᵀ + β, then var (n × C) = squared·Mᵀ + v, squared = (projection²)ᵀ.
// The projection is formed as R × n, not the n × R of F.linear, because MKL's SGEMM runs that
// orientation of the same product 1.3× faster here (measured, quiet, 1 and 2 threads: SD3-medium-like
// 4096 × 1536 → 1537, 206 against 268 ms at 1 thread; Flux-like 3072 → 3073 alike). Its square is
// written back as n × R (one pass, ~1% of the time), because MKL's mix GEMM rounds far worse when it
// sums over R down the columns of an R × n square: at R = 70000, 3.3× the tests' float32 bound,
// against 0.23–0.28× from the n × R square (as eager).
bool is_rows_of_features(const ConvGeometry& g) {
  return g.in_h == 1 && g.in_w == 1 && g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0;
}

// Rows per tile of the Linear path: 512 ran fastest of 256..4096 at 1 and 2 threads (SD3-like,
// Flux-like), within 3% of one GEMM over all 4096 rows at 1 thread and 5–10% ahead at 2.
constexpr int64_t kFactoredMaxTileRows = 512;

template <typename T>
void factored_rows(const glue::ConvHeadVarFactoredArgs& args) {
  using Acc = acc_t<T>;
  const ConvGeometry& g = args.geometry;
  const int64_t rank = g.out_channels;
  const int64_t features = g.in_channels;
  const int64_t bytes_per_row = (2 * rank + features) * static_cast<int64_t>(sizeof(Acc));
  const int64_t rows = std::max<int64_t>(1, g.batch);
  const int64_t most = std::min(kFactoredMaxTileRows, kFactoredTileBytes / std::max<int64_t>(1, bytes_per_row));
  const int64_t tile_rows = even_tile(rows, std::clamp<int64_t>(most, 1, rows));
  const auto phi = args.phi.view({g.batch, features});
  const auto var = args.var.view({g.batch, args.channels});
  const auto directions = args.proj_weight.view({rank, features});
  const auto proj_bias = args.proj_bias.defined() ? args.proj_bias.unsqueeze(1) : at::Tensor();
  const auto mix_t = args.mix.t();
  // One buffer for every tile: a tile of n rows uses its first R·n elements as a contiguous R × n.
  at::Tensor buffer = at::empty({rank * tile_rows}, args.var.options());
  at::Tensor squared = at::empty({tile_rows, rank}, args.var.options());
  for (int64_t r0 = 0; r0 < g.batch; r0 += tile_rows) {
    const int64_t n = std::min(tile_rows, g.batch - r0);
    const auto x = phi.narrow(0, r0, n).to(args.var.scalar_type());
    auto p = buffer.narrow(0, 0, rank * n).view({rank, n});
    if (proj_bias.defined()) {
      at::addmm_out(p, proj_bias, directions, x.t());
    } else {
      at::mm_out(p, directions, x.t());
    }
    auto sq = squared.narrow(0, 0, n);
    at::mul_out(sq, p.t(), p.t());
    auto out = var.narrow(0, r0, n);
    if (args.bias_var.defined()) {
      at::addmm_out(out, args.bias_var, sq, mix_t);
    } else {
      at::mm_out(out, sq, mix_t);
    }
    out.clamp_min_(0);  // clamp_variance's rule (kernels/variance.h); NaN stays NaN
  }
}

// Whole output rows per tile, `bytes_per_pixel` of tile buffers each, within the budget, spread
// evenly over the fewest tiles.
int64_t rows_per_tile(const ConvGeometry& g, int64_t bytes_per_pixel) {
  const int64_t pixels = std::min(kFactoredMaxTilePixels, kFactoredTileBytes / std::max<int64_t>(1, bytes_per_pixel));
  return even_tile(std::max<int64_t>(1, g.out_h), std::max<int64_t>(1, pixels / std::max<int64_t>(1, g.out_w)));
}

#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
}  // namespace
}  // namespace bdx::cpu
namespace at::native {
// ATen's oneDNN matmul (aten/src/ATen/native/mkldnn/Matmul.h, exported from libtorch_cpu but not
// among the installed headers): result = alpha·mat1·mat2 + beta·result, float32 on x86.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
namespace bdx::cpu {
namespace {
#endif

// projection (R × P) = directions (R × D) · patches (D × P), without the bias (the mix adds it).
// float32 goes through oneDNN's matmul unless the user allowed it reduced-precision math (bf16/tf32):
// on the AMD EPYC (Zen 4) where it was measured, MKL's SGEMM took 1.1–1.3× oneDNN's time for the conv
// heads' GEMMs (quiet, 1 and 2 threads: CelebA-like 156 against 120 ms, SD-like 228 against 207 ms
// at 1 thread), and with MKL the op lost to the eager composition's oneDNN convolution in some runs.
void project_patches(const at::Tensor& directions, const at::Tensor& patches, at::Tensor& projection) {
#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
  const auto precision = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  if (projection.scalar_type() == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
      precision != at::Float32Precision::BF16 && precision != at::Float32Precision::TF32) {
    at::native::mkldnn_matmul(directions, patches, projection, 0.0f, 1.0f);
    return;
  }
#endif
  at::mm_out(projection, directions, patches);
}

// The projection of a tile, one of two ways. The patches and one GEMM is the faster where an image
// takes at most two tiles (measured, quiet, 1 and 2 threads: CelebA-like 128→3 at 64², SD-like
// 320→4 at 32²: 1.10–1.17× the eager conv2d → square → mix, against 1.0× through the convolution);
// with more, narrower tiles (ADM-like 256→3 at 128², 10 tiles) it fell to 0.90–0.97×, and the
// convolution of each tile's input rows (ATen's conv2d, oneDNN on the CPU) runs at 1.02–1.04×.
// (With the GEMM in oneDNN, ADM-like's patches ran at 1.07–1.08×, within the convolution's spread.)
constexpr int64_t kMostTilesForPatches = 2;
constexpr int64_t kFactoredMinBandPixels = 256;

template <typename T>
void factored_conv(const glue::ConvHeadVarFactoredArgs& args) {
  using Acc = acc_t<T>;
  const ConvGeometry& g = args.geometry;
  const int64_t rank = g.out_channels;
  const int64_t taps = g.taps_per_channel();
  const int64_t patch_rows = rows_per_tile(g, (rank + taps) * static_cast<int64_t>(sizeof(Acc)));
  const bool through_patches = (g.out_h + patch_rows - 1) / patch_rows <= kMostTilesForPatches;
  const int64_t tile_rows = through_patches ? patch_rows : rows_per_tile(g, rank * static_cast<int64_t>(sizeof(Acc)));
  const auto directions = args.proj_weight.view({rank, taps});
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor patches;
  at::Tensor projection;
  for (int64_t b = 0; b < g.batch; ++b) {
    const T* image = glue::data_or_null<T>(args.phi) + b * g.in_channels * g.in_pixels();
    Acc* out_image = args.var.data_ptr<Acc>() + b * args.channels * g.out_pixels();
    for (int64_t oh0 = 0; oh0 < g.out_h; oh0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, g.out_h - oh0);
      const int64_t pixels = rows * g.out_w;
      if (!through_patches) {
        projection = project_rows(args, b, oh0, rows);
        mix_squared_projections<Acc>(projection.const_data_ptr<Acc>(), nullptr, rank, pixels, args.mix.const_data_ptr<Acc>(),
                                glue::data_or_null<Acc>(args.bias_var), args.channels, g.out_pixels(),
                                out_image + oh0 * g.out_w);
        continue;
      }
      if (!patches.defined() || patches.numel() < taps * pixels) {
        patches = at::empty({taps * pixels}, args.var.options());
        projection = at::empty({rank * pixels}, args.var.options());
      }
      // Each thread takes a band of the tile's rows through all three steps in its own part of the
      // buffers, the GEMM single-threaded inside: no barrier between the steps, and each GEMM on one
      // core. MKL's own threads on the whole tile scaled 1.75–1.97× from 1 to 2 threads here, the
      // bands 1.85–2.00×, in 0.95–1.03× MKL's time in the same runs (CelebA-like, SD-like, quiet);
      // with oneDNN's matmul the bands scale 1.8–2.0×. Each thread takes as many bands of at least
      // kFactoredMinBandPixels as fit: a GEMM's output (R × band) is revisited once per block of its
      // sum over D, so narrow bands keep it in cache. Quiet, same hour, eager / fused at 1 | 2 threads:
      // SD-like (R = 2881, 1024 pixels) one band a thread 0.99–1.09× | 1.03–1.08×, bands of ≥ 512
      // pixels 1.15× | 1.06×, ≥ 256 1.28× | 1.40×, ≥ 128 1.28× | 1.33×; CelebA-like 1.22–1.32× in all.
      // With fewer than kFactoredMinBandPixels per thread the tile stays whole and the GEMM threads it.
      const int64_t per_thread = std::max<int64_t>(1, pixels / (threads * kFactoredMinBandPixels));
      const int64_t bands = pixels >= threads * kFactoredMinBandPixels ? std::min(threads * per_thread, rows) : 1;
      at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
        for (int64_t band = begin; band < end; ++band) {
          const int64_t first = oh0 + rows * band / bands;
          const int64_t band_rows = oh0 + rows * (band + 1) / bands - first;
          const int64_t band_pixels = band_rows * g.out_w;
          const int64_t offset = (first - oh0) * g.out_w;
          auto band_patches = patches.narrow(0, taps * offset, taps * band_pixels).view({taps, band_pixels});
          auto band_projection = projection.narrow(0, rank * offset, rank * band_pixels).view({rank, band_pixels});
          gather_patches(g, image, first, band_rows, band_patches.data_ptr<Acc>());
          project_patches(directions, band_patches, band_projection);
          mix_squared_projections(band_projection.const_data_ptr<Acc>(), glue::data_or_null<Acc>(args.proj_bias),
                                  rank, band_pixels,
                                  args.mix.const_data_ptr<Acc>(), glue::data_or_null<Acc>(args.bias_var),
                                  args.channels, g.out_pixels(), out_image + first * g.out_w);
        }
      });
    }
  }
}

void compute_conv_head_var_factored(const glue::ConvHeadVarFactoredArgs& args) {
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_head_var_factored", [&] {
    if (is_rows_of_features(args.geometry)) return factored_rows<T>(args);
    factored_conv<T>(args);
  });
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("conv_head_mean_var", &bdx::glue::conv_head_mean_var<&bdx::cpu::compute_conv_head_mean_var>);
  m.impl("linear_head_mean_var", &bdx::glue::linear_head_mean_var<&bdx::cpu::compute_linear_head_mean_var>);
  m.impl("conv_head_var_factored", &bdx::glue::conv_head_var_factored<&bdx::cpu::compute_conv_head_var_factored>);
}

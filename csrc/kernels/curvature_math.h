// Patch geometry of a Conv2d head and the index math of its zero-padded im2col patches (docs/MATH.md §1.2),
// shared by the CPU and CUDA curvature accumulators. A patch φ_{n,p} is the receptive field of
// output position p of image n, flattened in `weight.flatten(1)` order (c_in, i, j); D = C_in·kh·kw.
#pragma once

#include "kernels/platform.h"

namespace bdx {

// φ is (batch, channels, height, width), contiguous; out_h × out_w output positions per image.
struct PatchGeometry {
  int64_t batch, channels, height, width;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t out_h, out_w;

  BDX_HD int64_t positions() const { return out_h * out_w; }
  BDX_HD int64_t taps() const { return kernel_h * kernel_w; }
  BDX_HD int64_t patch_size() const { return channels * taps(); }
  BDX_HD int64_t plane() const { return height * width; }
};

// Input row/column read by kernel tap row i (column j) at output row oh (column ow); outside
// [0, height) × [0, width) the patch reads zero padding.
BDX_HD int64_t input_row(const PatchGeometry& g, int64_t oh, int64_t i) {
  return oh * g.stride_h - g.pad_h + i * g.dilation_h;
}
BDX_HD int64_t input_col(const PatchGeometry& g, int64_t ow, int64_t j) {
  return ow * g.stride_w - g.pad_w + j * g.dilation_w;
}

// Offset within one channel plane read by tap (i, j) at output position p (row-major), or -1 for
// zero padding.
BDX_HD int64_t tap_plane_offset(const PatchGeometry& g, int64_t p, int64_t i, int64_t j) {
  const int64_t h = input_row(g, p / g.out_w, i);
  const int64_t w = input_col(g, p % g.out_w, j);
  if (h < 0 || h >= g.height || w < 0 || w >= g.width) return -1;
  return h * g.width + w;
}

// A position of the whole batch, q = n·P + p, split once so that the entries of its patch cost
// no further divisions of q.
struct PatchPosition {
  int64_t image, out_row, out_col;
};

BDX_HD PatchPosition patch_position(const PatchGeometry& g, int64_t q) {
  const int64_t p = q % g.positions();
  return PatchPosition{q / g.positions(), p / g.out_w, p % g.out_w};
}

// Entry d of the bias-augmented patch [φ_p; 1], split once so that reading it at many positions
// costs no divisions: d < D reads channel `channel` at the input row oh·stride_h + row_offset and
// column ow·stride_w + col_offset; d == D is the bias "1"; d > D (a tile's tail) reads 0.
struct AugmentedEntry {
  int64_t channel;  // or kBiasEntry, kPastPatch
  int64_t row_offset, col_offset;
};
constexpr int64_t kBiasEntry = -1;
constexpr int64_t kPastPatch = -2;

BDX_HD AugmentedEntry augmented_entry(const PatchGeometry& g, int64_t d) {
  if (d >= g.patch_size()) return AugmentedEntry{d == g.patch_size() ? kBiasEntry : kPastPatch, 0, 0};
  const int64_t tap = d % g.taps();
  return AugmentedEntry{d / g.taps(), input_row(g, 0, tap / g.kernel_w), input_col(g, 0, tap % g.kernel_w)};
}

template <typename Acc, typename T>
BDX_HD Acc augmented_patch_value(const T* phi, const PatchGeometry& g, const PatchPosition& pos,
                                 const AugmentedEntry& e) {
  if (e.channel < 0) return e.channel == kBiasEntry ? Acc(1) : Acc(0);
  const int64_t h = pos.out_row * g.stride_h + e.row_offset;
  const int64_t w = pos.out_col * g.stride_w + e.col_offset;
  if (h < 0 || h >= g.height || w < 0 || w >= g.width) return Acc(0);
  return load<Acc>(phi, ((pos.image * g.channels + e.channel) * g.height + h) * g.width + w);
}

// Σ_n φ[n, c, h, w]² for the element chw = (c·H + h)·W + w of one image: the diagonal GGN sums
// these over the positions each tap reads, so the batch is reduced first, once per input pixel.
template <typename Acc, typename T>
BDX_HD Acc batch_square_sum(const T* phi, const PatchGeometry& g, int64_t chw) {
  const int64_t image_stride = g.channels * g.plane();
  Acc sum = Acc(0);
  for (int64_t n = 0; n < g.batch; ++n) {
    const Acc v = load<Acc>(phi, n * image_stride + chw);
    sum += v * v;
  }
  return sum;
}

}  // namespace bdx

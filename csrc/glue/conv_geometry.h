// Convolution arguments shared by the head ops and the curvature ops (groups = 1 geometry).
#pragma once

#include <ATen/core/Tensor.h>

namespace bdx::glue {

// A (height, width) pair such as `stride`, each entry >= `minimum`.
void check_pair(at::IntArrayRef values, const char* op, const char* name, int64_t minimum);

// Checks `stride`, `padding` and `dilation` and copies them into a kernel geometry
// (PatchGeometry and ConvGeometry name these fields alike).
template <class Geometry>
void set_stride_padding_dilation(Geometry& g, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, const char* op) {
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
}

}  // namespace bdx::glue

// CPU implementation of the curvature accumulators (SPEC §1.2). The diagonal GGN reduces the
// batch per input pixel first (kernels/curvature_math.h). The EF and the patch Gram unfold a chunk
// of output positions at a time (the index math of curvature_math.h) and hand it to BLAS, so their
// extra memory is one chunk, never the unfold of the whole batch.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "glue/curvature_args.h"
#include "glue/dtype_dispatch.h"
#include "kernels/curvature_math.h"

namespace bdx::cpu {
namespace {

// Upper bound on the bytes of one unfolded chunk: large enough for efficient GEMMs (thousands of
// positions at D ≈ 1k), small next to the batch's unfold (C_in·k²·H·W per image).
constexpr int64_t kChunkBytes = int64_t(16) << 20;

int64_t chunk_positions(int64_t row_length, int64_t element_size) {
  return std::max<int64_t>(1, kChunkBytes / (std::max<int64_t>(1, row_length) * element_size));
}

// rows[k, :] = the patch of batch position q_begin + k, for k < count; `row_length` is D, or D + 1
// for the bias-augmented patch [φ_p; 1].
template <typename Acc, typename T>
void unfold_positions(const T* phi, const PatchGeometry& g, int64_t q_begin, int64_t count, int64_t row_length,
                      Acc* rows) {
  const int64_t patch = g.patch_size();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const PatchPosition pos = patch_position(g, q_begin + k);
      Acc* row = rows + k * row_length;
      for (int64_t c = 0; c < g.channels; ++c) {
        const T* plane = phi + (pos.image * g.channels + c) * g.plane();
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          const int64_t h = input_row(g, pos.out_row, i);
          Acc* out = row + (c * g.kernel_h + i) * g.kernel_w;
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const int64_t w = input_col(g, pos.out_col, j);
            const bool inside = h >= 0 && h < g.height && w >= 0 && w < g.width;
            out[j] = inside ? load<Acc>(plane, h * g.width + w) : Acc(0);
          }
        }
      }
      if (row_length > patch) row[patch] = Acc(1);
    }
  });
}

at::Tensor conv_diag_ggn(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto args = glue::prepare_conv_diag_ggn(phi, kernel_size, stride, padding, dilation);
  const PatchGeometry g = args.geometry;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ggn", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    Acc* out = args.out.data_ptr<Acc>();
    at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> square_sum(g.plane());
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t hw = 0; hw < g.plane(); ++hw) square_sum[hw] = batch_square_sum<Acc>(x, g, c * g.plane() + hw);
        for (int64_t tap = 0; tap < g.taps(); ++tap) {
          Acc sum = Acc(0);
          for (int64_t p = 0; p < g.positions(); ++p) {
            const int64_t offset = tap_plane_offset(g, p, tap / g.kernel_w, tap % g.kernel_w);
            if (offset >= 0) sum += square_sum[offset];
          }
          out[c * g.taps() + tap] = sum;
        }
      }
    });
  });
  return args.out;
}

at::Tensor conv_diag_ef(const at::Tensor& phi, const at::Tensor& residual, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto args = glue::prepare_conv_diag_ef(phi, residual, kernel_size, stride, padding, dilation);
  const PatchGeometry g = args.geometry;
  const int64_t out_channels = args.out.size(0);
  const int64_t patch = g.patch_size();
  const int64_t positions = g.positions();
  if (g.batch == 0 || out_channels == 0 || patch == 0) return args.out;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ef", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    const auto acc_options = args.out.options();
    const at::Tensor r = args.residual.to(acc_options.dtype()).view({g.batch, out_channels, positions});
    const at::Tensor weight_sums = args.out.view({out_channels, patch});
    const int64_t chunk = std::min(positions, chunk_positions(patch, sizeof(Acc)));
    at::Tensor rows = at::empty({chunk, patch}, acc_options);
    at::Tensor gradient = at::empty({out_channels, patch}, acc_options);
    for (int64_t n = 0; n < g.batch; ++n) {
      // The per-image gradient of ½‖f − y‖² w.r.t. the weight, Σ_p r[c, p] φ_p, is complete only
      // after every position of the image; then it is squared into the sum.
      gradient.zero_();
      for (int64_t p0 = 0; p0 < positions; p0 += chunk) {
        const int64_t count = std::min(chunk, positions - p0);
        unfold_positions<Acc>(x, g, n * positions + p0, count, patch, rows.data_ptr<Acc>());
        gradient.addmm_(r[n].narrow(1, p0, count), rows.narrow(0, 0, count));
      }
      weight_sums.addcmul_(gradient, gradient);
    }
  });
  return args.out;
}

at::Tensor conv_patch_gram(const at::Tensor& phi, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto args = glue::prepare_conv_patch_gram(phi, kernel_size, stride, padding, dilation);
  const PatchGeometry g = args.geometry;
  const int64_t augmented = g.patch_size() + 1;
  const int64_t total = g.batch * g.positions();
  if (total == 0) return args.out;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_patch_gram", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    const int64_t chunk = std::min(total, chunk_positions(augmented, sizeof(Acc)));
    at::Tensor rows = at::empty({chunk, augmented}, args.out.options());
    for (int64_t q0 = 0; q0 < total; q0 += chunk) {
      const int64_t count = std::min(chunk, total - q0);
      unfold_positions<Acc>(x, g, q0, count, augmented, rows.data_ptr<Acc>());
      const at::Tensor block = rows.narrow(0, 0, count);
      args.out.addmm_(block.t(), block);
    }
  });
  return args.out;
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("conv_diag_ggn", &bdx::cpu::conv_diag_ggn);
  m.impl("conv_diag_ef", &bdx::cpu::conv_diag_ef);
  m.impl("conv_patch_gram", &bdx::cpu::conv_patch_gram);
}

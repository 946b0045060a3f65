// CPU implementation of the curvature accumulators (docs/MATH.md §1.2). The diagonal GGN reduces the
// batch per input pixel first (cpu/square_sums.h). The EF and the patch Gram unfold a chunk
// of output positions at a time (the index math of curvature_math.h) and hand it to BLAS, so their
// extra memory is one chunk, never the unfold of the whole batch.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/gram.h"
#include "cpu/square_sums.h"
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

// columns[d, k] = entry d of the patch of batch position q_begin + k, for k < count (im2col
// layout); `rows` is D, or D + 1 with the bias row of ones of [φ_p; 1]. Each entry d walks the
// positions along output rows, so it reads φ's rows contiguously (for stride 1) and writes its
// row of `columns` contiguously.
template <typename Acc, typename T>
void unfold_positions(const T* phi, const PatchGeometry& g, int64_t q_begin, int64_t count, int64_t rows,
                      Acc* columns) {
  const int64_t patch = g.patch_size();
  at::parallel_for(0, patch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const int64_t c = d / g.taps();
      const int64_t i = d % g.taps() / g.kernel_w;
      const int64_t j = d % g.kernel_w;
      Acc* out = columns + d * count;
      PatchPosition pos = patch_position(g, q_begin);
      for (int64_t k = 0; k < count;) {
        const int64_t run = std::min(count - k, g.out_w - pos.out_col);
        const int64_t h = input_row(g, pos.out_row, i);
        const bool row_inside = h >= 0 && h < g.height;
        const T* row = phi + ((pos.image * g.channels + c) * g.height + (row_inside ? h : 0)) * g.width;
        for (int64_t t = 0; t < run; ++t) {
          const int64_t w = input_col(g, pos.out_col + t, j);
          out[k + t] = row_inside && w >= 0 && w < g.width ? load<Acc>(row, w) : Acc(0);
        }
        k += run;
        pos.out_col += run;
        if (pos.out_col == g.out_w) {
          pos.out_col = 0;
          if (++pos.out_row == g.out_h) {
            pos.out_row = 0;
            ++pos.image;
          }
        }
      }
    }
  });
  if (rows > patch) std::fill(columns + patch * count, columns + (patch + 1) * count, Acc(1));
}

void compute_conv_diag_ggn(const glue::CurvatureArgs& args) {
  const PatchGeometry g = args.geometry;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ggn", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    Acc* out = args.out.data_ptr<Acc>();
    const Isa isa = cpu_isa();
    at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> square_sum(g.plane());
      for (int64_t c = begin; c < end; ++c) {
        // Σ_n φ[n, c]² per input pixel: the batch is reduced first, then each tap sums its pixels.
        std::fill(square_sum.begin(), square_sum.end(), Acc(0));
        AddSquareSums::run(isa, x + c * g.plane(), g.batch, g.channels * g.plane(), g.plane(), square_sum.data());
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            Acc sum = Acc(0);
            for (int64_t oh = 0; oh < g.out_h; ++oh) {
              const int64_t h = input_row(g, oh, i);
              if (h < 0 || h >= g.height) continue;
              const Acc* row = square_sum.data() + h * g.width;
              for (int64_t ow = 0; ow < g.out_w; ++ow) {
                const int64_t w = input_col(g, ow, j);
                if (w >= 0 && w < g.width) sum += row[w];
              }
            }
            out[(c * g.kernel_h + i) * g.kernel_w + j] = sum;
          }
        }
      }
    });
  });
}

void compute_conv_diag_ef(const glue::CurvatureArgs& args) {
  const PatchGeometry g = args.geometry;
  const int64_t out_channels = args.out.size(0);
  const int64_t patch = g.patch_size();
  const int64_t positions = g.positions();
  if (g.batch == 0 || out_channels == 0 || patch == 0) return;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_diag_ef", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    const auto acc_options = args.out.options();
    const at::Tensor r = args.residual.to(acc_options.dtype()).view({g.batch, out_channels, positions});
    const at::Tensor weight_sums = args.out.view({out_channels, patch});
    const int64_t chunk = std::min(positions, chunk_positions(patch, sizeof(Acc)));
    at::Tensor columns = at::empty({patch, chunk}, acc_options);
    at::Tensor gradient = at::empty({out_channels, patch}, acc_options);
    for (int64_t n = 0; n < g.batch; ++n) {
      // The per-image gradient of ½‖f − y‖² w.r.t. the weight, Σ_p r[c, p] φ_p, is complete only
      // after every position of the image; then it is squared into the sum.
      gradient.zero_();
      for (int64_t p0 = 0; p0 < positions; p0 += chunk) {
        const int64_t count = std::min(chunk, positions - p0);
        unfold_positions<Acc>(x, g, n * positions + p0, count, patch, columns.data_ptr<Acc>());
        const at::Tensor patches = columns.view(-1).narrow(0, 0, patch * count).view({patch, count});
        gradient.addmm_(r[n].narrow(1, p0, count), patches.t());
      }
      weight_sums.addcmul_(gradient, gradient);
    }
  });
}

void compute_conv_patch_gram(const glue::CurvatureArgs& args) {
  const PatchGeometry g = args.geometry;
  const int64_t augmented = g.patch_size() + 1;
  const int64_t total = g.batch * g.positions();
  if (total == 0) return;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "conv_patch_gram", [&] {
    using Acc = acc_t<T>;
    const T* x = reinterpret_cast<const T*>(args.phi.const_data_ptr());
    const int64_t chunk = std::min(total, chunk_positions(augmented, sizeof(Acc)));
    at::Tensor columns = at::empty({augmented, chunk}, args.out.options());
    for (int64_t q0 = 0; q0 < total; q0 += chunk) {
      const int64_t count = std::min(chunk, total - q0);
      unfold_positions<Acc>(x, g, q0, count, augmented, columns.data_ptr<Acc>());
      const at::Tensor patches = columns.view(-1).narrow(0, 0, augmented * count).view({augmented, count});
      add_upper_gram(args.out, patches.t());
    }
    mirror_upper<Acc>(args.out);
  });
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("conv_diag_ggn", &bdx::glue::conv_diag_ggn<&bdx::cpu::compute_conv_diag_ggn>);
  m.impl("conv_diag_ef", &bdx::glue::conv_diag_ef<&bdx::cpu::compute_conv_diag_ef>);
  m.impl("conv_patch_gram", &bdx::glue::conv_patch_gram<&bdx::cpu::compute_conv_patch_gram>);
}

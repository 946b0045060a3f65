// CPU implementation of the Linear-head fitting sums (docs/MATH.md §1.2, kernels/linear_curvature_math.h).
// The diagonal GGN is one vectorised pass over φ, each thread summing its own contiguous rows into
// its own float64 partial sums (added in thread order at the end: no atomics, no false sharing).
// The EF and the Gram are products (C·D and D² per row), left to BLAS in float64 on tiles of
// augmented rows [φ; 1]: each tile is converted once, and the float64 copy of φ never exists whole.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/gram.h"
#include "cpu/square_sums.h"
#include "cpu/simd.h"
#include "glue/dtype_dispatch.h"
#include "glue/linear_curvature_args.h"
#include "glue/tensor_checks.h"
#include "kernels/linear_curvature_math.h"

namespace bdx::cpu {
namespace {

// Elements per thread below which a second thread costs more than it saves.
constexpr int64_t kElementGrain = 32768;
// Bytes of one tile of augmented float64 rows: large enough for efficient GEMMs (the Gram's
// (D+1)² output is read and written once per tile), small next to φ in float64.
constexpr int64_t kTileBytes = int64_t(16) << 20;

int64_t row_grain(int64_t features) { return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, features)); }

// ---------------------------------------------------------------------------------------------
// linear_diag_ggn

void compute_linear_diag_ggn(const glue::LinearCurvatureArgs& args) {
  const TokenGeometry& g = args.geometry;
  if (g.rows() == 0 || g.features == 0) return;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_diag_ggn", [&] {
    const T* phi = glue::data_or_null<T>(args.phi);
    std::vector<double> partial(static_cast<size_t>(at::get_num_threads() * g.features), 0.0);
    const Isa isa = cpu_isa();
    at::parallel_for(0, g.rows(), row_grain(g.features), [&](int64_t begin, int64_t end) {
      AddSquareSums::run(isa, phi + begin * g.features, end - begin, g.features, g.features,
                         partial.data() + at::get_thread_num() * g.features);
    });
    double* out = args.out.data_ptr<double>();
    for (size_t t = 0; t < partial.size(); t += g.features) {
      for (int64_t j = 0; j < g.features; ++j) out[j] += partial[t + j];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tiles of augmented rows, for linear_diag_ef and linear_gram

// dst row r = [φ[r] as float64, 1], rows of D + 1.
template <int kBytes, typename T>
void augment_rows(const T* src, int64_t rows, int64_t features, double* dst) {
  constexpr int kL = kLanes<double, kBytes>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * features;
    double* out = dst + r * (features + 1);
    int64_t j = 0;
    for (; j + kL <= features; j += kL) store_lanes<kBytes>(out + j, load_widened<kBytes, double>(in + j));
    for (; j < features; ++j) out[j] = load<double>(in, j);
    out[features] = 1.0;
  }
}

struct AugmentRows {
  BDX_ISA_VARIANTS(augment_rows)
};

int64_t tile_rows(const TokenGeometry& g, int64_t rows) {
  return std::clamp<int64_t>(kTileBytes / (g.augmented() * int64_t(sizeof(double))), 1, std::max<int64_t>(1, rows));
}

// Calls consume(first_row, tile) for consecutive tiles of rows [begin, end) of φ, each tile the
// (count, D + 1) float64 augmented rows; `scratch` holds at least one tile.
template <typename T, typename Consume>
void for_each_augmented_tile(const glue::LinearCurvatureArgs& args, int64_t begin, int64_t end,
                             const at::Tensor& scratch, Consume consume) {
  const TokenGeometry& g = args.geometry;
  const T* phi = glue::data_or_null<T>(args.phi);
  const Isa isa = cpu_isa();
  for (int64_t r0 = begin; r0 < end; r0 += scratch.size(0)) {
    const int64_t count = std::min(scratch.size(0), end - r0);
    double* tile = scratch.data_ptr<double>();
    at::parallel_for(0, count, row_grain(g.features), [&](int64_t b, int64_t e) {
      AugmentRows::run(isa, phi + (r0 + b) * g.features, e - b, g.features, tile + b * g.augmented());
    });
    consume(r0, scratch.narrow(0, 0, count));
  }
}

void compute_linear_gram(const glue::LinearCurvatureArgs& args) {
  const TokenGeometry& g = args.geometry;
  if (g.rows() == 0) return;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_gram", [&] {
    const at::Tensor scratch = at::empty({tile_rows(g, g.rows()), g.augmented()}, args.out.options());
    for_each_augmented_tile<T>(args, 0, g.rows(), scratch,
                               [&](int64_t, const at::Tensor& tile) { add_upper_gram(args.out, tile); });
    mirror_upper<double>(args.out);
  });
}

void compute_linear_diag_ef(const glue::LinearCurvatureArgs& args) {
  const TokenGeometry& g = args.geometry;
  if (g.rows() == 0 || g.outputs == 0) return;
  BDX_DISPATCH_FLOATING(args.phi.scalar_type(), "linear_diag_ef", [&] {
    const at::Tensor scratch = at::empty({tile_rows(g, g.tokens), g.augmented()}, args.out.options());
    const at::Tensor residual = args.residual.view({g.rows(), g.outputs});
    at::Tensor gradient = at::empty({g.outputs, g.augmented()}, args.out.options());
    for (int64_t n = 0; n < g.samples; ++n) {
      // The sample's gradient Σ_t r[n, t]ᵀ [φ[n, t]; 1] is complete only after all of its tokens.
      gradient.zero_();
      for_each_augmented_tile<T>(args, n * g.tokens, (n + 1) * g.tokens, scratch,
                                 [&](int64_t r0, const at::Tensor& tile) {
                                   const at::Tensor r = residual.narrow(0, r0, tile.size(0)).to(at::kDouble);
                                   gradient.addmm_(r.t(), tile);
                                 });
      args.out.addcmul_(gradient, gradient);
    }
  });
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("linear_diag_ggn", &bdx::glue::linear_diag_ggn<&bdx::cpu::compute_linear_diag_ggn>);
  m.impl("linear_diag_ef", &bdx::glue::linear_diag_ef<&bdx::cpu::compute_linear_diag_ef>);
  m.impl("linear_gram", &bdx::glue::linear_gram<&bdx::cpu::compute_linear_gram>);
}

#include "glue/linear_curvature_args.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <vector>

#include "glue/tensor_checks.h"

namespace bdx::glue {
namespace {

// The product of dims [first, last) of t (dims, not numel / D: D may be 0).
int64_t dims_product(const at::Tensor& t, int64_t first, int64_t last) {
  int64_t product = 1;
  for (int64_t d = first; d < last; ++d) product *= t.size(d);
  return product;
}

// Every row of φ (..., D) as one sample's single token.
TokenGeometry rows_of(const at::Tensor& phi, const char* op) {
  check_floating(phi, op, "phi");
  TORCH_CHECK(phi.dim() >= 1, op, ": `phi` must have shape (..., D), got a 0-d tensor");
  return TokenGeometry{dims_product(phi, 0, phi.dim() - 1), 1, phi.size(-1), 0};
}

at::Tensor float64_zeros(const at::Tensor& phi, at::IntArrayRef shape) {
  return at::zeros(shape, phi.options().dtype(at::kDouble));
}

}  // namespace

LinearCurvatureArgs prepare_linear_diag_ggn(const at::Tensor& phi) {
  const TokenGeometry g = rows_of(phi, "linear_diag_ggn");
  return LinearCurvatureArgs{phi.contiguous(), at::Tensor(), g, float64_zeros(phi, {g.features})};
}

LinearCurvatureArgs prepare_linear_diag_ef(const at::Tensor& phi, const at::Tensor& residual) {
  constexpr const char* op = "linear_diag_ef";
  check_floating(phi, op, "phi");
  TORCH_CHECK(phi.dim() >= 2, op, ": `phi` must have shape (N, ..., D) with a leading sample dim, got ",
              phi.sizes());
  TORCH_CHECK(residual.dim() == phi.dim(), op, ": `residual` must have shape (N, ..., C) with the leading dims of ",
              "`phi` ", phi.sizes().slice(0, phi.dim() - 1), ", got ", residual.sizes());
  std::vector<int64_t> shape(phi.sizes().begin(), phi.sizes().end() - 1);
  shape.push_back(residual.size(-1));
  check_like(residual, op, "residual", phi, "phi", shape);
  const TokenGeometry g{phi.size(0), dims_product(phi, 1, phi.dim() - 1), phi.size(-1), residual.size(-1)};
  return LinearCurvatureArgs{phi.contiguous(), residual.contiguous(), g,
                             float64_zeros(phi, {g.outputs, g.augmented()})};
}

LinearCurvatureArgs prepare_linear_gram(const at::Tensor& phi) {
  const TokenGeometry g = rows_of(phi, "linear_gram");
  return LinearCurvatureArgs{phi.contiguous(), at::Tensor(), g, float64_zeros(phi, {g.augmented(), g.augmented()})};
}

}  // namespace bdx::glue

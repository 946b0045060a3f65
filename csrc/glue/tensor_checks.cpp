#include "glue/tensor_checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace bdx::glue {

at::ScalarType result_dtype(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": `", name, "` must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref, const char* ref_name,
                at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name, "` is on ",
              ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(), " but `",
              ref_name, "` has dtype ", ref.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` must have shape ", shape, ", got ", t.sizes());
}

void check_optional_like(const std::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& ref,
                         const char* ref_name, at::IntArrayRef shape) {
  if (t.has_value() && t->defined()) check_like(*t, op, name, ref, ref_name, shape);
}

void check_finite_scalar(double value, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(value), op, ": `", name, "` must be finite, got ", value);
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

}  // namespace bdx::glue

// Argument validation shared by every backend's glue: each error names the argument at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <optional>

namespace bdx::glue {

// float16/bfloat16 inputs are accumulated and returned in float32; float32/float64 are kept.
at::ScalarType result_dtype(at::ScalarType input);

void check_floating(const at::Tensor& t, const char* op, const char* name);
// Same device and dtype as `ref`, with the exact shape `shape`.
void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref, const char* ref_name,
                at::IntArrayRef shape);
void check_optional_like(const std::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& ref,
                         const char* ref_name, at::IntArrayRef shape);
void check_finite_scalar(double value, const char* op, const char* name);

// Contiguous view of an optional input (undefined when absent).
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t);

// Typed data pointer, null for an undefined (absent) tensor.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

}  // namespace bdx::glue

// Maps torch's scalar types onto the torch-free storage types of kernels/platform.h.
#pragma once

#include <ATen/Dispatch.h>

#include "kernels/platform.h"

namespace bdx::glue {

template <typename TorchScalar>
struct kernel_storage {
  using type = TorchScalar;
};
template <>
struct kernel_storage<at::Half> {
  using type = bdx::half_t;
};
template <>
struct kernel_storage<at::BFloat16> {
  using type = bdx::bfloat16_t;
};

}  // namespace bdx::glue

// Runs the body with `T` bound to the kernel storage type of `dtype`.
#define BDX_DISPATCH_FLOATING(dtype, op_name, ...)                                                \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op_name, [&] {                 \
    using T = typename ::bdx::glue::kernel_storage<scalar_t>::type;                               \
    __VA_ARGS__();                                                                                \
  })

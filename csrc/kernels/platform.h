// Portability layer for the kernels: qualifiers, launch syntax and 16-bit float storage.
// Torch-free; included by CPU kernels (g++), CUDA kernels (nvcc) and the host emulation (g++).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(BDX_CUDA_EMULATION)
#include "emulation/cuda_emulation.h"
#endif

#if defined(__CUDACC__) || defined(BDX_CUDA_EMULATION)
#define BDX_HD __host__ __device__ __forceinline__
#else
#define BDX_HD inline
#endif

// Kernel launch that both nvcc and the host emulation understand.
#if defined(BDX_CUDA_EMULATION)
#define BDX_LAUNCH(kernel, grid, block, stream, ...) \
  ::bdx_emu::launch((grid), (block), kernel, __VA_ARGS__)
#else
#define BDX_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace bdx {

// Bit-exact storage of IEEE half and bfloat16: the same layout as at::Half / at::BFloat16 and
// __half / __nv_bfloat16, so the glue can pass torch's data pointers without torch headers here.
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

BDX_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

BDX_HD float to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) {
    return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

BDX_HD float to_float(bfloat16_t b) { return float_from_bits(static_cast<uint32_t>(b.bits) << 16); }

// Accumulation type: float for float and the 16-bit formats, double for double.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

template <typename Acc>
BDX_HD Acc load(const float* p, int64_t i) { return static_cast<Acc>(p[i]); }
template <typename Acc>
BDX_HD Acc load(const double* p, int64_t i) { return static_cast<Acc>(p[i]); }
template <typename Acc>
BDX_HD Acc load(const half_t* p, int64_t i) { return static_cast<Acc>(to_float(p[i])); }
template <typename Acc>
BDX_HD Acc load(const bfloat16_t* p, int64_t i) { return static_cast<Acc>(to_float(p[i])); }

}  // namespace bdx

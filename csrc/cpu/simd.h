// Explicit SIMD for the CPU kernels: GCC/Clang vector types (the code states the vector width, so
// nothing depends on the auto-vectoriser), each kernel body compiled for AVX-512, AVX2 and the
// baseline ISA and picked at run time (a wheel must run anywhere; the width matters). A file that
// includes this header must be compiled without LTO (CMakeLists.txt): link-time inlining drops the
// target attributes and with them the vector code.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/platform.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BDX_X86_DISPATCH 1
// `flatten` inlines the whole body into the wrapper, so all of it is compiled for that ISA.
#define BDX_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512"), flatten))
#define BDX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c"), flatten))
#endif

namespace bdx::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa hardware_isa() {
#if defined(BDX_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

// BAYESDIFF_CPU_ISA=avx2|baseline selects a lower compilation, so that the tests can run every
// compilation of the kernels on one machine. Read at every call (once per op, not per element).
inline Isa cpu_isa() {
  static const Isa hardware = hardware_isa();
  const char* forced = std::getenv("BAYESDIFF_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return hardware;
  const std::string name(forced);
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "baseline",
              "BAYESDIFF_CPU_ISA must be avx512, avx2 or baseline, got '", name, "'");
  const Isa wanted = name == "baseline" ? Isa::kBaseline : (name == "avx2" ? Isa::kAvx2 : Isa::kAvx512);
  return std::min(wanted, hardware);
}

// Inside a struct: static `run(isa, args...)` calls `body<kVectorBytes>(args...)` compiled for `isa`,
// with that ISA's register width (wider vectors than the registers spill).
#if defined(BDX_X86_DISPATCH)
#define BDX_ISA_VARIANTS(body)                                                     \
  template <typename... A>                                                         \
  static BDX_TARGET_AVX512 void run_avx512(A... a) { body<64>(a...); }             \
  template <typename... A>                                                         \
  static BDX_TARGET_AVX2 void run_avx2(A... a) { body<32>(a...); }                 \
  template <typename... A>                                                         \
  static void run_baseline(A... a) { body<16>(a...); }                             \
  template <typename... A>                                                         \
  static void run(Isa isa, A... a) {                                               \
    switch (isa) {                                                                 \
      case Isa::kAvx512: return run_avx512(a...);                                  \
      case Isa::kAvx2: return run_avx2(a...);                                      \
      default: return run_baseline(a...);                                          \
    }                                                                              \
  }
#else
#define BDX_ISA_VARIANTS(body) \
  template <typename... A>     \
  static void run(Isa, A... a) { body<16>(a...); }
#endif
constexpr int kWidestVectorBytes = 64;

// A SIMD vector of kBytes (GCC/Clang vector extension) and its lane count.
template <typename E, int kBytes>
struct simd {
  typedef E type __attribute__((vector_size(kBytes)));
};
template <typename E, int kBytes>
using Simd = typename simd<E, kBytes>::type;
template <typename E, int kBytes>
constexpr int kLanes = kBytes / sizeof(E);

template <int kBytes, typename Acc>
Simd<Acc, kBytes> broadcast(Acc value) {
  return Simd<Acc, kBytes>{} + value;
}

template <int kBytes, bool kUnitStride, typename Acc>
Simd<Acc, kBytes> load_lanes(const Acc* src, int64_t stride) {
  Simd<Acc, kBytes> v;
  if (kUnitStride) {
    __builtin_memcpy(&v, src, sizeof v);
  } else {
    for (int l = 0; l < kLanes<Acc, kBytes>; ++l) v[l] = src[l * stride];
  }
  return v;
}

template <int kBytes, typename Acc>
void store_lanes(Acc* dst, Simd<Acc, kBytes> v) {
  __builtin_memcpy(dst, &v, sizeof v);
}

// kLanes<Out, kBytes> consecutive values of storage type T, widened to Out (float or double): the
// 16-bit formats by vector instructions (F16C's vcvtph2ps for half, a 16-bit shift for bfloat16).
template <int kBytes, typename Out, typename T>
Simd<Out, kBytes> load_widened(const T* src) {
  using V = Simd<Out, kBytes>;
  constexpr int kN = kLanes<Out, kBytes>;
  constexpr int kSourceBytes = kN * static_cast<int>(sizeof(T));
  if constexpr (std::is_same_v<T, Out>) {
    return load_lanes<kBytes, true>(src, 1);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    Simd<uint16_t, kSourceBytes> bits;
    __builtin_memcpy(&bits, src, sizeof bits);
    const Simd<uint32_t, 4 * kN> wide = __builtin_convertvector(bits, Simd<uint32_t, 4 * kN>) << 16;
    Simd<float, 4 * kN> f;
    __builtin_memcpy(&f, &wide, sizeof f);
    if constexpr (std::is_same_v<Out, float>) {
      return f;
    } else {
      return __builtin_convertvector(f, V);
    }
  } else if constexpr (std::is_same_v<T, half_t>) {
#if defined(__FLT16_MAX__)
    Simd<_Float16, kSourceBytes> h;
    __builtin_memcpy(&h, src, sizeof h);
    return __builtin_convertvector(h, V);
#else
    V v;
    for (int l = 0; l < kN; ++l) v[l] = load<Out>(src, l);
    return v;
#endif
  } else {
    Simd<T, kSourceBytes> x;
    __builtin_memcpy(&x, src, sizeof x);
    return __builtin_convertvector(x, V);
  }
}

// kLanes<acc_t<T>, kBytes> consecutive values of storage type T in the accumulation type.
template <int kBytes, typename T>
Simd<acc_t<T>, kBytes> load_converted(const T* src) {
  return load_widened<kBytes, acc_t<T>>(src);
}

}  // namespace bdx::cpu

// CPU implementation of the moment ops: the per-element math of kernels/moment_math.h on explicit
// vectors (cpu/simd.h). The ops stream their inputs once and are bound by memory bandwidth, so
// each thread owns one contiguous range of elements (at::parallel_for) and keeps all of its state in
// registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/simd.h"
#include "glue/dtype_dispatch.h"
#include "glue/moment_args.h"
#include "glue/tensor_checks.h"
#include "kernels/moment_math.h"

namespace bdx::cpu {
namespace {

// Elements per thread below which a second thread costs more than it saves.
constexpr int64_t kElementGrain = 32768;

// ---------------------------------------------------------------------------------------------
// moment_step: an elementwise map; absent inputs (eps_var, cov_x_eps) are compile-time zeros.

template <typename T>
struct StepJob {
  using Acc = acc_t<T>;
  MomentCoefficients<Acc> k;
  const T *mean_x, *var_x, *eps_mean, *eps_var, *cov_x_eps;
  Acc *mean_next, *var_next;
};

template <int kBytes, typename T>
void moment_step_range(const StepJob<T>* job_ptr, int64_t begin, int64_t end) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  constexpr int kL = kLanes<Acc, kBytes>;
  const StepJob<T>& j = *job_ptr;
  int64_t i = begin;
  for (; i + kL <= end; i += kL) {
    const V ev = j.eps_var ? load_converted<kBytes>(j.eps_var + i) : V{};
    const V cov = j.cov_x_eps ? load_converted<kBytes>(j.cov_x_eps + i) : V{};
    V mean, var;
    moment_step_element(j.k, load_converted<kBytes>(j.mean_x + i), load_converted<kBytes>(j.var_x + i),
                        load_converted<kBytes>(j.eps_mean + i), ev, cov, &mean, &var);
    store_lanes<kBytes>(j.mean_next + i, mean);
    store_lanes<kBytes>(j.var_next + i, var);
  }
  for (; i < end; ++i) {
    moment_step_element(j.k, load<Acc>(j.mean_x, i), load<Acc>(j.var_x, i), load<Acc>(j.eps_mean, i),
                        j.eps_var ? load<Acc>(j.eps_var, i) : Acc(0), j.cov_x_eps ? load<Acc>(j.cov_x_eps, i) : Acc(0),
                        &j.mean_next[i], &j.var_next[i]);
  }
}

struct MomentStepRange {
  BDX_ISA_VARIANTS(moment_step_range)
};

void compute_moment_step(const glue::MomentStepArgs& args) {
  BDX_DISPATCH_FLOATING(args.mean_x.scalar_type(), "moment_step", [&] {
    using Acc = acc_t<T>;
    const StepJob<T> job{args.step.coefficients<Acc>(),
                         glue::data_or_null<T>(args.mean_x),
                         glue::data_or_null<T>(args.var_x),
                         glue::data_or_null<T>(args.eps_mean),
                         glue::data_or_null<T>(args.eps_var),
                         glue::data_or_null<T>(args.cov_x_eps),
                         args.mean_next.data_ptr<Acc>(),
                         args.var_next.data_ptr<Acc>()};
    const Isa isa = cpu_isa();
    // Ranges start at multiples of a cache line of outputs, so no two threads write one line.
    constexpr int64_t kLine = 64 / sizeof(Acc);
    const int64_t lines = (args.mean_x.numel() + kLine - 1) / kLine;
    at::parallel_for(0, lines, kElementGrain / kLine, [&](int64_t begin, int64_t end) {
      MomentStepRange::run(isa, &job, begin * kLine, std::min(end * kLine, args.mean_x.numel()));
    });
  });
}

// ---------------------------------------------------------------------------------------------
// mc_moments, mc_moment_step: the S samples of one element lie `numel` apart in each of the (S, ...)
// stacks. The naive order (a block of elements, its Welford state in registers, all S samples)
// reads S·3 strided streams at once, more than the hardware prefetchers track: measured on Zen 4
// (quiet, S = 10) it took ~1.85× the time of one reduction over the same bytes; chunked as below it
// takes 1.1–1.5× (python/BENCHMARKS.md, bench_recurrence). So each thread walks its range in chunks
// of kChunkBytes of accumulators per stream; per chunk it passes over the samples kSamplesPerPass
// at a time (3·kSamplesPerPass contiguous streams), each block's state
// in registers during a pass and in a per-thread buffer (5 accumulators × kChunkBytes, in L1)
// between passes, and it prefetches the same samples of the next chunk into L2 as it goes (without
// the prefetch: 1.1–1.2× the time). Sizes: the best measured of 512–8192 bytes and 1–10 samples
// per pass (quiet, S = 10, both threads counts: 4–5 samples per pass 5–25% faster than 3).

constexpr int64_t kChunkBytes = 4096;
constexpr int64_t kSamplesPerPass = 5;

// One job type for both ops: mc_moment_step (var_x and mean_next set) finishes each element with
// the step instead of storing E[ε] and Cov, so the two share the walk over the samples.
template <typename T>
struct McJob {
  using Acc = acc_t<T>;
  const T *x, *eps_mean, *eps_var, *mean_x;
  int64_t samples, numel;
  Acc* var_eps;
  Acc *e_eps, *cov_x_eps;  // mc_moments; null for mc_moment_step
  const T* var_x;          // mc_moment_step; null for mc_moments
  MomentCoefficients<Acc> k;
  Acc *mean_next, *var_next;
  // 1/(s+1) for s < samples: Welford's weights, divided once per call instead of once per block and
  // sample in the inner loop (measured, quiet: 5–10% of the AVX-512 kernel's time).
  const Acc* inv_counts;

  bool steps() const { return mean_next != nullptr; }
};

template <typename T>
constexpr int64_t kChunk = kChunkBytes / sizeof(acc_t<T>);

// Into L2 (a prefetch never faults, so past the end of the stack is harmless).
template <int kElements, typename T>
void prefetch_next_chunk(const T* stream) {
  const char* ahead = reinterpret_cast<const char*>(stream + kChunk<T>);
  for (int64_t line = 0; line < kElements * int64_t{sizeof(T)}; line += 64) __builtin_prefetch(ahead + line, 0, 2);
}

// Samples [s_begin, s_end) of the block of kVectors vectors at element i into `state`.
template <int kBytes, typename T, int kVectors>
void mc_accumulate_block(const McJob<T>& j, int64_t i, int64_t s_begin, int64_t s_end,
                         McState<Simd<acc_t<T>, kBytes>>* state) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  constexpr int kL = kLanes<Acc, kBytes>;
  for (int64_t s = s_begin; s < s_end; ++s) {
    const V inv_count = broadcast<kBytes>(j.inv_counts[s]);
    const int64_t at = s * j.numel + i;
    prefetch_next_chunk<kVectors * kL>(j.x + at);
    prefetch_next_chunk<kVectors * kL>(j.eps_mean + at);
    if (j.eps_var) prefetch_next_chunk<kVectors * kL>(j.eps_var + at);
    for (int k = 0; k < kVectors; ++k) {
      const V ev = j.eps_var ? load_converted<kBytes>(j.eps_var + at + k * kL) : V{};
      mc_accumulate(state[k], load_converted<kBytes>(j.x + at + k * kL), load_converted<kBytes>(j.eps_mean + at + k * kL),
                    ev, inv_count);
    }
  }
}

template <int kBytes, typename T, int kVectors>
void mc_store_block(const McJob<T>& j, int64_t i, const McState<Simd<acc_t<T>, kBytes>>* state) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  constexpr int kL = kLanes<Acc, kBytes>;
  const V inv_samples = broadcast<kBytes>(Acc(1) / static_cast<Acc>(j.samples));
  for (int k = 0; k < kVectors; ++k) {
    const int64_t at = i + k * kL;
    const V mean_x = load_converted<kBytes>(j.mean_x + at);
    V first, v, last;
    if (j.steps()) {
      mc_step_finalize(j.k, state[k], inv_samples, mean_x, load_converted<kBytes>(j.var_x + at), &first, &last, &v);
    } else {
      mc_finalize(state[k], inv_samples, mean_x, &first, &v, &last);
    }
    store_lanes<kBytes>((j.steps() ? j.mean_next : j.e_eps) + at, first);
    store_lanes<kBytes>(j.var_eps + at, v);
    store_lanes<kBytes>((j.steps() ? j.var_next : j.cov_x_eps) + at, last);
  }
}

// Whole blocks [i, i + count) of one chunk, all samples; `saved` holds the state between passes.
template <int kBytes, typename T, int kVectors>
void mc_chunk(const McJob<T>& j, int64_t i, int64_t count, McState<Simd<acc_t<T>, kBytes>>* saved) {
  using V = Simd<acc_t<T>, kBytes>;
  constexpr int64_t kBlock = kVectors * kLanes<acc_t<T>, kBytes>;
  for (int64_t s_begin = 0; s_begin < j.samples; s_begin += kSamplesPerPass) {
    const int64_t s_end = std::min(j.samples, s_begin + kSamplesPerPass);
    for (int64_t block = 0; block * kBlock < count; ++block) {
      McState<V> state[kVectors];
      McState<V>* kept = saved + block * kVectors;
      for (int k = 0; k < kVectors; ++k) state[k] = s_begin == 0 ? mc_init<V>() : kept[k];
      mc_accumulate_block<kBytes, T, kVectors>(j, i + block * kBlock, s_begin, s_end, state);
      if (s_end < j.samples) {
        for (int k = 0; k < kVectors; ++k) kept[k] = state[k];
      } else {
        mc_store_block<kBytes, T, kVectors>(j, i + block * kBlock, state);
      }
    }
  }
}

template <typename T>
void mc_element(const McJob<T>& j, int64_t i) {
  using Acc = acc_t<T>;
  McState<Acc> state = mc_init<Acc>();
  for (int64_t s = 0; s < j.samples; ++s) {
    const int64_t at = s * j.numel + i;
    mc_accumulate(state, load<Acc>(j.x, at), load<Acc>(j.eps_mean, at), j.eps_var ? load<Acc>(j.eps_var, at) : Acc(0),
                  j.inv_counts[s]);
  }
  const Acc inv_samples = Acc(1) / static_cast<Acc>(j.samples);
  if (j.steps()) {
    mc_step_finalize(j.k, state, inv_samples, load<Acc>(j.mean_x, i), load<Acc>(j.var_x, i), &j.mean_next[i],
                     &j.var_next[i], &j.var_eps[i]);
  } else {
    mc_finalize(state, inv_samples, load<Acc>(j.mean_x, i), &j.e_eps[i], &j.var_eps[i], &j.cov_x_eps[i]);
  }
}

// Four vectors per block where there are 32 vector registers (AVX-512), two where there are 16.
template <int kBytes>
constexpr int kMcVectors = kBytes == 64 ? 4 : 2;

template <int kBytes, typename T>
void mc_range(const McJob<T>* job_ptr, int64_t begin, int64_t end) {
  using Acc = acc_t<T>;
  constexpr int kVectors = kMcVectors<kBytes>;
  constexpr int64_t kBlock = kVectors * kLanes<Acc, kBytes>;
  static_assert(kChunk<T> % kBlock == 0, "a chunk holds whole blocks");
  McState<Simd<Acc, kBytes>> saved[kChunk<T> / kBlock * kVectors];
  int64_t i = begin;
  for (; i + kBlock <= end; i += kChunk<T>) {
    const int64_t count = std::min(kChunk<T>, (end - i) / kBlock * kBlock);
    mc_chunk<kBytes, T, kVectors>(*job_ptr, i, count, saved);
    if (count < kChunk<T>) {
      i += count;
      break;
    }
  }
  for (; i < end; ++i) mc_element(*job_ptr, i);
}

struct McRange {
  BDX_ISA_VARIANTS(mc_range)
};

// Ranges of whole blocks of the widest ISA (cache-line multiples); the work per element grows with
// S, so the grain shrinks with it.
template <typename T>
void run_mc(McJob<T> job) {
  using Acc = acc_t<T>;
  std::vector<Acc> inv_counts(job.samples);
  for (int64_t s = 0; s < job.samples; ++s) inv_counts[s] = Acc(1) / static_cast<Acc>(s + 1);
  job.inv_counts = inv_counts.data();
  const Isa isa = cpu_isa();
  constexpr int64_t kUnit = kMcVectors<kWidestVectorBytes> * kLanes<Acc, kWidestVectorBytes>;
  const int64_t units = (job.numel + kUnit - 1) / kUnit;
  const int64_t grain = std::max<int64_t>(1, kElementGrain / (kUnit * job.samples));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    McRange::run(isa, &job, begin * kUnit, std::min(end * kUnit, job.numel));
  });
}

// The fields both ops fill alike from their prepared arguments (the rest stay null).
template <typename T, typename Args>
McJob<T> samples_job(const Args& args) {
  McJob<T> job{};
  job.x = glue::data_or_null<T>(args.x);
  job.eps_mean = glue::data_or_null<T>(args.eps_mean);
  job.eps_var = glue::data_or_null<T>(args.eps_var);
  job.mean_x = glue::data_or_null<T>(args.mean_x);
  job.samples = args.samples;
  job.numel = args.numel;
  job.var_eps = args.var_eps.template data_ptr<acc_t<T>>();
  return job;
}

void compute_mc_moments(const glue::McMomentsArgs& args) {
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moments", [&] {
    using Acc = acc_t<T>;
    McJob<T> job = samples_job<T>(args);
    job.e_eps = args.e_eps.data_ptr<Acc>();
    job.cov_x_eps = args.cov_x_eps.data_ptr<Acc>();
    run_mc(job);
  });
}

void compute_mc_moment_step(const glue::McMomentStepArgs& args) {
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moment_step", [&] {
    using Acc = acc_t<T>;
    McJob<T> job = samples_job<T>(args);
    job.var_x = glue::data_or_null<T>(args.var_x);
    job.k = args.step.coefficients<Acc>();
    job.mean_next = args.mean_next.data_ptr<Acc>();
    job.var_next = args.var_next.data_ptr<Acc>();
    run_mc(job);
  });
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("moment_step", &bdx::glue::moment_step<&bdx::cpu::compute_moment_step>);
  m.impl("mc_moments", &bdx::glue::mc_moments<&bdx::cpu::compute_mc_moments>);
  m.impl("mc_moment_step", &bdx::glue::mc_moment_step<&bdx::cpu::compute_mc_moment_step>);
}

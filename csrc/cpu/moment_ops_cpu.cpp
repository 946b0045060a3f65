// CPU implementation of the moment ops: the per-element math of kernels/moment_math.h on explicit
// vectors (cpu/simd.h). The ops stream their inputs once and are bound by memory bandwidth, so
// each thread owns one contiguous range of elements (at::parallel_for) and keeps all of its state in
// registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

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
// stacks. A block of elements with its state in registers reads one stream per stack and sample.
// All 3·S streams at once (S = 10) ran at ~1.4–1.9× the time of one reduction over the same bytes
// (quiet, Zen 4, one thread), chunked passes over 5 samples at a time with the state kept in L1
// between passes at 1.3–1.5×. So each thread walks its range in chunks of kChunkBytes of outputs and
// reads the stacks of a chunk in two passes: Σγ² over the S samples of eps_var into the var_eps
// output (which stays in cache), walked like ATen's own sum(0) (vectorized_outer_sum: four vectors
// of one stack, the S rows in turn), then x and m together (2·S streams, the sums that pair them),
// one vector per stream and visit. Each stream is prefetched kPrefetchBytes ahead (without: ~1.2–1.3×
// slower). Measured against the read limit (sum(0) of the three stacks), one thread, inputs in
// memory, paired rounds: the second pass with four vectors per visit, as the first, ran the op at
// 1.24–1.31×, with one at 1.13–1.25× (warm and two threads gain too). No better: chunks of 4–256
// KiB, prefetch distances of 0.5–2 KiB and other hints, prefetching mean_x and var_x too, the passes
// in the other order (the sums of x and m parked in L1), three passes of S streams each (x alone into
// an L1/L2 buffer, then m), other byte offsets of the stacks within their pages. In the same runs the
// first pass alone took 1.15–1.25× a sum(0) of eps_var (it also writes var_eps), the rest of the op
// ~1.1–1.2× the two sum(0)s of x and m, which read ~7 % fewer bytes (no mean_x, var_x).

constexpr int64_t kChunkBytes = 16384;
constexpr int64_t kPrefetchBytes = 1024;

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

  bool steps() const { return mean_next != nullptr; }
};

template <typename T>
constexpr int64_t kChunk = kChunkBytes / sizeof(acc_t<T>);

// The kElements values at `stream` + kPrefetchBytes into L2 (a prefetch never faults, so past the end
// of the stack is harmless).
template <int kElements, typename T>
void prefetch_ahead(const T* stream) {
  const char* ahead = reinterpret_cast<const char*>(stream) + kPrefetchBytes;
  for (int64_t line = 0; line < kElements * int64_t{sizeof(T)}; line += 64) __builtin_prefetch(ahead + line, 0, 2);
}

// First pass over a block of kVectors vectors at element i: Σγ² over the samples into var_eps.
template <int kBytes, typename T, int kVectors>
void mc_sum_eps_var_block(const McJob<T>& j, int64_t i) {
  using V = Simd<acc_t<T>, kBytes>;
  constexpr int kL = kLanes<acc_t<T>, kBytes>;
  V sum[kVectors] = {};
  for (int64_t s = 0; s < j.samples; ++s) {
    const T* at = j.eps_var + s * j.numel + i;
    prefetch_ahead<kVectors * kL>(at);
    for (int k = 0; k < kVectors; ++k) sum[k] += load_converted<kBytes>(at + k * kL);
  }
  for (int k = 0; k < kVectors; ++k) store_lanes<kBytes>(j.var_eps + i + k * kL, sum[k]);
}

// Second pass: the sums that pair x and m, then the outputs (Σγ² read back from var_eps).
template <int kBytes, typename T, int kVectors>
void mc_pairs_block(const McJob<T>& j, int64_t i) {
  using Acc = acc_t<T>;
  using V = Simd<Acc, kBytes>;
  constexpr int kL = kLanes<Acc, kBytes>;
  V mean_x[kVectors], eps_first[kVectors];
  McState<V> state[kVectors];
  for (int k = 0; k < kVectors; ++k) {
    mean_x[k] = load_converted<kBytes>(j.mean_x + i + k * kL);
    eps_first[k] = load_converted<kBytes>(j.eps_mean + i + k * kL);
    state[k] = mc_init<V>();
  }
  for (int64_t s = 0; s < j.samples; ++s) {
    const int64_t at = s * j.numel + i;
    prefetch_ahead<kVectors * kL>(j.x + at);
    prefetch_ahead<kVectors * kL>(j.eps_mean + at);
    for (int k = 0; k < kVectors; ++k) {
      mc_accumulate_pairs(state[k], load_converted<kBytes>(j.x + at + k * kL),
                          load_converted<kBytes>(j.eps_mean + at + k * kL), mean_x[k], eps_first[k]);
    }
  }
  const V inv_samples = broadcast<kBytes>(Acc(1) / static_cast<Acc>(j.samples));
  for (int k = 0; k < kVectors; ++k) {
    const int64_t out = i + k * kL;
    if (j.eps_var) state[k].sum_eps_var = load_lanes<kBytes, true>(j.var_eps + out, 1);
    V first, v, last;
    if (j.steps()) {
      mc_step_finalize(j.k, state[k], inv_samples, mean_x[k], eps_first[k], load_converted<kBytes>(j.var_x + out),
                       &first, &last, &v);
    } else {
      mc_finalize(state[k], inv_samples, eps_first[k], &first, &v, &last);
    }
    store_lanes<kBytes>((j.steps() ? j.mean_next : j.e_eps) + out, first);
    store_lanes<kBytes>(j.var_eps + out, v);
    store_lanes<kBytes>((j.steps() ? j.var_next : j.cov_x_eps) + out, last);
  }
}

template <typename T>
void mc_element(const McJob<T>& j, int64_t i) {
  using Acc = acc_t<T>;
  const Acc mean_x = load<Acc>(j.mean_x, i);
  const Acc eps_first = load<Acc>(j.eps_mean, i);
  McState<Acc> state = mc_init<Acc>();
  for (int64_t s = 0; s < j.samples; ++s) {
    const int64_t at = s * j.numel + i;
    mc_accumulate(state, load<Acc>(j.x, at), load<Acc>(j.eps_mean, at), j.eps_var ? load<Acc>(j.eps_var, at) : Acc(0),
                  mean_x, eps_first);
  }
  const Acc inv_samples = Acc(1) / static_cast<Acc>(j.samples);
  if (j.steps()) {
    mc_step_finalize(j.k, state, inv_samples, mean_x, eps_first, load<Acc>(j.var_x, i), &j.mean_next[i],
                     &j.var_next[i], &j.var_eps[i]);
  } else {
    mc_finalize(state, inv_samples, eps_first, &j.e_eps[i], &j.var_eps[i], &j.cov_x_eps[i]);
  }
}

// Vectors per block of the first pass (a plain sum, like one reduction): four where there are 32
// vector registers (AVX-512), two where there are 16. The second pass takes one vector per block with
// AVX-512 (one cache line per stream and visit; four ran 3–15 % slower), two with the 16-register ISAs
// (on AVX2 one and two are equal, on the baseline ISA one is ~1.5× slower).
template <int kBytes>
constexpr int kSumVectors = kBytes == 64 ? 4 : 2;
template <int kBytes>
constexpr int kPairVectors = kBytes == 64 ? 1 : 2;

template <int kBytes, typename T>
void mc_range(const McJob<T>* job_ptr, int64_t begin, int64_t end) {
  const McJob<T>& j = *job_ptr;
  constexpr int64_t kLanesAcc = kLanes<acc_t<T>, kBytes>;
  constexpr int64_t kSumBlock = kSumVectors<kBytes> * kLanesAcc;
  constexpr int64_t kPairBlock = kPairVectors<kBytes> * kLanesAcc;
  static_assert(kSumBlock % kPairBlock == 0 && kChunk<T> % kSumBlock == 0, "a chunk holds whole blocks");
  int64_t i = begin;
  while (end - i >= kSumBlock) {
    const int64_t chunk_end = i + std::min(kChunk<T>, (end - i) / kSumBlock * kSumBlock);
    if (j.eps_var) {
      for (int64_t block = i; block < chunk_end; block += kSumBlock) {
        mc_sum_eps_var_block<kBytes, T, kSumVectors<kBytes>>(j, block);
      }
    }
    for (int64_t block = i; block < chunk_end; block += kPairBlock) {
      mc_pairs_block<kBytes, T, kPairVectors<kBytes>>(j, block);
    }
    i = chunk_end;
  }
  for (; i < end; ++i) mc_element(j, i);
}

struct McRange {
  BDX_ISA_VARIANTS(mc_range)
};

// Ranges of whole blocks of the widest ISA (cache-line multiples); the work per element grows with
// S, so the grain shrinks with it.
template <typename T>
void run_mc(McJob<T> job) {
  using Acc = acc_t<T>;
  const Isa isa = cpu_isa();
  constexpr int64_t kUnit = kSumVectors<kWidestVectorBytes> * kLanes<Acc, kWidestVectorBytes>;
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

// CPU implementation of the moment ops: the per-element math of kernels/moment_math.h in
// at::parallel_for loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "glue/dtype_dispatch.h"
#include "glue/moment_args.h"
#include "glue/tensor_checks.h"
#include "kernels/moment_math.h"

namespace bdx::cpu {
namespace {

constexpr int64_t kGrain = 4096;

void compute_moment_step(const glue::MomentStepArgs& args) {
  BDX_DISPATCH_FLOATING(args.mean_x.scalar_type(), "moment_step", [&] {
    using Acc = acc_t<T>;
    const MomentCoefficients<Acc> k = args.coefficients<Acc>();
    const T* mx = glue::data_or_null<T>(args.mean_x);
    const T* vx = glue::data_or_null<T>(args.var_x);
    const T* em = glue::data_or_null<T>(args.eps_mean);
    const T* ev = glue::data_or_null<T>(args.eps_var);
    const T* cv = glue::data_or_null<T>(args.cov_x_eps);
    Acc* mean_out = args.mean_next.data_ptr<Acc>();
    Acc* var_out = args.var_next.data_ptr<Acc>();
    at::parallel_for(0, args.mean_x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        moment_step_element(k, load<Acc>(mx, i), load<Acc>(vx, i), load<Acc>(em, i), ev ? load<Acc>(ev, i) : Acc(0),
                            cv ? load<Acc>(cv, i) : Acc(0), &mean_out[i], &var_out[i]);
      }
    });
  });
}

void compute_mc_moments(const glue::McMomentsArgs& args) {
  BDX_DISPATCH_FLOATING(args.x.scalar_type(), "mc_moments", [&] {
    using Acc = acc_t<T>;
    const T* xs = glue::data_or_null<T>(args.x);
    const T* ms = glue::data_or_null<T>(args.eps_mean);
    const T* vs = glue::data_or_null<T>(args.eps_var);
    const T* mx = glue::data_or_null<T>(args.mean_x);
    Acc* e_out = args.e_eps.data_ptr<Acc>();
    Acc* v_out = args.var_eps.data_ptr<Acc>();
    Acc* c_out = args.cov_x_eps.data_ptr<Acc>();
    const int64_t n = args.numel;
    const int64_t samples = args.samples;
    // Samples outermost within a block of elements: each pass streams one contiguous slice of every
    // stack, and the running state lives in separate arrays so the inner loop vectorises.
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      constexpr int64_t kBlock = 512;
      Acc mean_x[kBlock], mean_eps[kBlock], m2_eps[kBlock], comoment[kBlock], sum_eps_var[kBlock];
      for (int64_t start = begin; start < end; start += kBlock) {
        const int64_t count = std::min(kBlock, end - start);
        std::fill_n(mean_x, count, Acc(0));
        std::fill_n(mean_eps, count, Acc(0));
        std::fill_n(m2_eps, count, Acc(0));
        std::fill_n(comoment, count, Acc(0));
        std::fill_n(sum_eps_var, count, Acc(0));
        for (int64_t s = 0; s < samples; ++s) {
          const Acc inv_count = Acc(1) / static_cast<Acc>(s + 1);
          const int64_t offset = s * n + start;
          if (vs) {
            for (int64_t j = 0; j < count; ++j) {
              mc_accumulate(mean_x[j], mean_eps[j], m2_eps[j], comoment[j], sum_eps_var[j], load<Acc>(xs, offset + j),
                            load<Acc>(ms, offset + j), load<Acc>(vs, offset + j), inv_count);
            }
          } else {
            for (int64_t j = 0; j < count; ++j) {
              mc_accumulate(mean_x[j], mean_eps[j], m2_eps[j], comoment[j], sum_eps_var[j], load<Acc>(xs, offset + j),
                            load<Acc>(ms, offset + j), Acc(0), inv_count);
            }
          }
        }
        const Acc inv_samples = Acc(1) / static_cast<Acc>(samples);
        for (int64_t j = 0; j < count; ++j) {
          const McState<Acc> state{mean_x[j], mean_eps[j], m2_eps[j], comoment[j], sum_eps_var[j]};
          const int64_t i = start + j;
          mc_finalize(state, inv_samples, load<Acc>(mx, i), &e_out[i], &v_out[i], &c_out[i]);
        }
      }
    });
  });
}

}  // namespace
}  // namespace bdx::cpu

TORCH_LIBRARY_IMPL(bayesdiff_ext, CPU, m) {
  m.impl("moment_step", &bdx::glue::moment_step<&bdx::cpu::compute_moment_step>);
  m.impl("mc_moments", &bdx::glue::mc_moments<&bdx::cpu::compute_mc_moments>);
}

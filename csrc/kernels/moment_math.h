// Per-element math of the moment recurrence (docs/MATH.md §2), shared by the CPU and CUDA kernels.
#pragma once

#include "kernels/platform.h"

namespace bdx {

template <typename Acc>
struct MomentCoefficients {
  Acc a;
  Acc b;
  Acc c2;
  bool clamp;
};

// One affine sampler step x' = a·x + b·ε + c·z on diagonal moments.
template <typename Acc>
BDX_HD void moment_step_element(const MomentCoefficients<Acc>& k, Acc mean_x, Acc var_x, Acc eps_mean,
                                Acc eps_var, Acc cov_x_eps, Acc* mean_next, Acc* var_next) {
  *mean_next = k.a * mean_x + k.b * eps_mean;
  Acc v = k.a * k.a * var_x + Acc(2) * k.a * k.b * cov_x_eps + k.b * k.b * eps_var + k.c2;
  // A noisy Monte Carlo covariance can push the sum below zero; a variance never is. A NaN stays
  // a NaN: clamping must not hide broken inputs.
  if (k.clamp && v < Acc(0)) v = Acc(0);
  *var_next = v;
}

// Running one-pass (Welford) statistics over the S Monte Carlo samples of one element.
template <typename Acc>
struct McState {
  Acc mean_x;       // running mean of x^i
  Acc mean_eps;     // running mean of m^i
  Acc m2_eps;       // Σ (m^i − mean)²
  Acc comoment;     // Σ (x^i − mean_x)(m^i − mean_eps)
  Acc sum_eps_var;  // Σ γ²^i
};

template <typename Acc>
BDX_HD McState<Acc> mc_init() {
  return McState<Acc>{Acc(0), Acc(0), Acc(0), Acc(0), Acc(0)};
}

// `inv_count` is 1/(i+1) for the i-th sample (0-based). The scalar form lets the CPU kernel keep
// the state in separate arrays (structure of arrays), which the compiler vectorises.
template <typename Acc>
BDX_HD void mc_accumulate(Acc& mean_x, Acc& mean_eps, Acc& m2_eps, Acc& comoment, Acc& sum_eps_var, Acc x, Acc eps,
                          Acc eps_var, Acc inv_count) {
  const Acc dx = x - mean_x;
  const Acc de = eps - mean_eps;
  mean_x += dx * inv_count;
  mean_eps += de * inv_count;
  const Acc de_after = eps - mean_eps;
  m2_eps += de * de_after;
  comoment += dx * de_after;
  sum_eps_var += eps_var;
}

template <typename Acc>
BDX_HD void mc_accumulate(McState<Acc>& s, Acc x, Acc eps, Acc eps_var, Acc inv_count) {
  mc_accumulate(s.mean_x, s.mean_eps, s.m2_eps, s.comoment, s.sum_eps_var, x, eps, eps_var, inv_count);
}

// E[ε] = mean m; Var[ε] = mean γ² + population var of m; Cov(x, ε) = mean(x·m) − E[x]·E[ε],
// written as comoment/S + (mean_S x − E[x])·E[ε] so that no large terms cancel.
template <typename Acc>
BDX_HD void mc_finalize(const McState<Acc>& s, Acc inv_samples, Acc mean_x_given, Acc* e_eps, Acc* var_eps,
                        Acc* cov_x_eps) {
  *e_eps = s.mean_eps;
  Acc v = s.sum_eps_var * inv_samples + s.m2_eps * inv_samples;
  if (v < Acc(0)) v = Acc(0);  // rounding only: both terms are sums of non-negative values
  *var_eps = v;
  *cov_x_eps = s.comoment * inv_samples + (s.mean_x - mean_x_given) * s.mean_eps;
}

}  // namespace bdx

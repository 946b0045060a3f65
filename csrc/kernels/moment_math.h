// Per-element math of the moment recurrence (docs/MATH.md §2), shared by the CPU and CUDA kernels.
#pragma once

#include "kernels/platform.h"
#include "kernels/variance.h"

namespace bdx {

template <typename Acc>
struct MomentCoefficients {
  Acc a;
  Acc b;
  Acc c2;
  bool clamp;
};

// One affine sampler step x' = a·x + b·ε + c·z on diagonal moments. `V` is Acc or a vector of Acc.
template <typename Acc, typename V>
BDX_HD void moment_step_element(const MomentCoefficients<Acc>& k, V mean_x, V var_x, V eps_mean, V eps_var,
                                V cov_x_eps, V* mean_next, V* var_next) {
  *mean_next = k.a * mean_x + k.b * eps_mean;
  // A noisy Monte Carlo covariance (or a negative input variance) can push the sum below zero.
  const V v = (k.a * k.a) * var_x + (Acc(2) * k.a * k.b) * cov_x_eps + (k.b * k.b) * eps_var + k.c2;
  *var_next = k.clamp ? clamp_variance(v) : v;
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
  return McState<Acc>{Acc{}, Acc{}, Acc{}, Acc{}, Acc{}};
}

// `inv_count` is 1/(i+1) for the i-th sample (0-based). `Acc` may be a vector type on the CPU,
// which keeps the state of a block of elements in registers.
template <typename Acc>
BDX_HD void mc_accumulate(McState<Acc>& s, Acc x, Acc eps, Acc eps_var, Acc inv_count) {
  const Acc dx = x - s.mean_x;
  const Acc de = eps - s.mean_eps;
  s.mean_x += dx * inv_count;
  s.mean_eps += de * inv_count;
  const Acc de_after = eps - s.mean_eps;
  s.m2_eps += de * de_after;
  s.comoment += dx * de_after;
  s.sum_eps_var += eps_var;
}

// E[ε] = mean m; Var[ε] = mean γ² + population var of m; Cov(x, ε) = mean(x·m) − E[x]·E[ε],
// written as comoment/S + (mean_S x − E[x])·E[ε] so that no large terms cancel.
template <typename Acc>
BDX_HD void mc_finalize(const McState<Acc>& s, Acc inv_samples, Acc mean_x_given, Acc* e_eps, Acc* var_eps,
                        Acc* cov_x_eps) {
  *e_eps = s.mean_eps;
  // Below zero only through a negative input variance γ² (the spread term m2 is a sum of squares).
  *var_eps = clamp_variance(s.sum_eps_var * inv_samples + s.m2_eps * inv_samples);
  *cov_x_eps = s.comoment * inv_samples + (s.mean_x - mean_x_given) * s.mean_eps;
}

// The step straight from the Monte Carlo state (mc_moment_step): E[ε], Var[ε] and Cov(x, ε) of
// mc_finalize go into moment_step_element without leaving registers. Var[ε] is returned too.
template <typename Acc, typename V>
BDX_HD void mc_step_finalize(const MomentCoefficients<Acc>& k, const McState<V>& s, V inv_samples, V mean_x_given,
                             V var_x, V* mean_next, V* var_next, V* var_eps) {
  V e_eps, cov_x_eps;
  mc_finalize(s, inv_samples, mean_x_given, &e_eps, var_eps, &cov_x_eps);
  moment_step_element(k, mean_x_given, var_x, e_eps, *var_eps, cov_x_eps, mean_next, var_next);
}

}  // namespace bdx

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

// One-pass statistics over the S Monte Carlo samples of one element, as shifted sums: with
// d = E[x] − x^i (E[x] the given mean) and e = m^0 − m^i (m^0 the first sample's head mean), every
// sample adds to five independent sums. No serial chain runs through the samples (Welford's running
// means do), and the shifts keep the sums at the scale of the spread, so a large common offset of m
// (or of x) cancels exactly in the subtractions, not in E[m²] − E[m]². The sample is the subtrahend
// (shift − sample, not sample − shift) because that is the operand an x86 subtraction can read from
// memory: one instruction fewer per sample in the CPU kernel's streaming loop (measured 1–5 % faster
// with the inputs in memory). Negation is exact, so the results are bit-for-bit those of the other sign.
template <typename Acc>
struct McState {
  Acc sum_d;        // Σ (E[x] − x^i)
  Acc sum_e;        // Σ (m^0 − m^i)
  Acc sum_ee;       // Σ (m^0 − m^i)²
  Acc sum_de;       // Σ (E[x] − x^i)(m^0 − m^i)
  Acc sum_eps_var;  // Σ γ²^i
};

template <typename Acc>
BDX_HD McState<Acc> mc_init() {
  return McState<Acc>{Acc{}, Acc{}, Acc{}, Acc{}, Acc{}};
}

// The sums over one sample that need x and m (all but Σγ²), with the shifts of its element: E[x]
// (`mean_x_given`) and m^0 (`eps_first`). `Acc` may be a vector type on the CPU, which keeps the
// state of a block of elements in registers.
template <typename Acc>
BDX_HD void mc_accumulate_pairs(McState<Acc>& s, Acc x, Acc eps, Acc mean_x_given, Acc eps_first) {
  const Acc d = mean_x_given - x;
  const Acc e = eps_first - eps;
  s.sum_d += d;
  s.sum_e += e;
  s.sum_ee += e * e;
  s.sum_de += d * e;
}

template <typename Acc>
BDX_HD void mc_accumulate(McState<Acc>& s, Acc x, Acc eps, Acc eps_var, Acc mean_x_given, Acc eps_first) {
  mc_accumulate_pairs(s, x, eps, mean_x_given, eps_first);
  s.sum_eps_var += eps_var;
}

// E[ε] = m^0 − mean e; Var[ε] = mean γ² + population var of m = mean γ² + (mean e² − (mean e)²);
// Cov(x, ε) = mean (x − E[x])·m = mean (−d)·(m^0 − e) = mean d·e − (mean d)·m^0.
template <typename Acc>
BDX_HD void mc_finalize(const McState<Acc>& s, Acc inv_samples, Acc eps_first, Acc* e_eps, Acc* var_eps,
                        Acc* cov_x_eps) {
  const Acc mean_e = s.sum_e * inv_samples;
  *e_eps = eps_first - mean_e;
  // The spread is a variance (only rounding takes it below zero); the sum is below zero only
  // through a negative input variance γ².
  const Acc spread = clamp_variance(s.sum_ee * inv_samples - mean_e * mean_e);
  *var_eps = clamp_variance(s.sum_eps_var * inv_samples + spread);
  *cov_x_eps = s.sum_de * inv_samples - (s.sum_d * inv_samples) * eps_first;
}

// The step straight from the Monte Carlo state (mc_moment_step): E[ε], Var[ε] and Cov(x, ε) of
// mc_finalize go into moment_step_element without leaving registers. Var[ε] is returned too.
template <typename Acc, typename V>
BDX_HD void mc_step_finalize(const MomentCoefficients<Acc>& k, const McState<V>& s, V inv_samples, V mean_x_given,
                             V eps_first, V var_x, V* mean_next, V* var_next, V* var_eps) {
  V e_eps, cov_x_eps;
  mc_finalize(s, inv_samples, eps_first, &e_eps, var_eps, &cov_x_eps);
  moment_step_element(k, mean_x_given, var_x, e_eps, *var_eps, cov_x_eps, mean_next, var_next);
}

}  // namespace bdx

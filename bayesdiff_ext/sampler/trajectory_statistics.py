"""From the final images of trajectory Monte Carlo to Var[x_0 | x_T] and its two parts (docs/MATH.md §2.3).

The design: J noise streams z_j (J = 1 for a deterministic sampler); stream j runs the posterior
mean's weights once (x̄_j = Φ(x_T; θ_MAP, z_j), the "MAP trajectory") and K weight draws
x_jk = Φ(x_T; θ_jk, z_j). By the law of total variance,

    Var[x_0] = E_z Var_θ[x_0 | z] + Var_z E_θ[x_0 | z]          (epistemic + aleatoric).

Estimators, per pixel:

* epistemic = mean over j of the within-stream spread w_j:
    - ``centre='mean'``, independent or Sobol draws: the sample variance over k (divisor K − 1:
      unbiased for independent draws; Sobol points are not independent, see docs);
    - ``centre='mean'``, antithetic pairs (θ_p, θ_{p+K/2}) = μ ± Σ^{1/2}z_p: with the pair's half
      difference d_p and mean u_p, Var = E[d²] + Var(u) exactly (the pair is symmetric in ±z), so
      w_j = mean_p d_p² + var_p(u_p) (divisor P − 1; the second term only when P ≥ 2 pairs, one
      pair estimates the odd part E[d²] alone, whose bias is the even part Var(u), second order);
    - ``centre='map'``: the mean squared deviation from the MAP trajectory, mean_k (x_jk − x̄_j)²:
      K degrees of freedom instead of K − 1 (it is the mean squared error of the returned image
      under the posterior, Var + (E[x_0] − x̄)², the bias being the second-order shift of the mean).
* aleatoric = the sample variance over the J MAP trajectories (divisor J − 1), an estimate of
  Var_z Φ(x_T; θ_MAP, z) ≈ Var_z E_θ[x_0 | z] (equal to first order in the weight deviation);
  0 for a deterministic sampler.
* variance = epistemic + aleatoric: both terms are ≥ 0 by construction, nothing is clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CENTRES", "TrajectoryMoments", "trajectory_moments"]

CENTRES = ("mean", "map")


@dataclass
class TrajectoryMoments:
    mean: torch.Tensor  # (B, ...) the mean over all weight draws
    epistemic: torch.Tensor  # (B, ...)
    aleatoric: torch.Tensor  # (B, ...)

    @property
    def variance(self) -> torch.Tensor:
        return self.epistemic + self.aleatoric


def trajectory_moments(finals: torch.Tensor, maps: torch.Tensor, draws: str, centre: str) -> TrajectoryMoments:
    """The estimators above.

    Args:
        finals (`torch.Tensor` of shape `(J, K, B, ...)`): x_0 of draw k in noise stream j; for
            antithetic draws, draw k and k + K/2 are a ± pair.
        maps (`torch.Tensor` of shape `(J, B, ...)`): x_0 of the MAP trajectory of each stream.
        draws (`str`): ``'independent'``, ``'antithetic'`` or ``'sobol'``.
        centre (`str`): ``'mean'`` or ``'map'``.

    Returns:
        :class:`TrajectoryMoments` in float64.
    """
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
    finals, maps = finals.to(torch.float64), maps.to(torch.float64)
    streams, count = finals.shape[:2]
    if centre == "map":
        within = (finals - maps[:, None]).square().mean(dim=1)
    elif draws == "antithetic":
        plus, minus = finals.chunk(2, dim=1)
        within = ((plus - minus) / 2).square().mean(dim=1)
        if count >= 4:
            within = within + ((plus + minus) / 2).var(dim=1)
    else:
        if count < 2:
            raise ValueError("centre='mean' needs at least 2 weight draws per noise stream; use centre='map'")
        within = finals.var(dim=1)
    aleatoric = maps.var(dim=0) if streams >= 2 else torch.zeros_like(maps[0])
    return TrajectoryMoments(finals.mean(dim=(0, 1)), within.mean(dim=0), aleatoric)

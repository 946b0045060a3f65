"""Hamiltonian Monte Carlo on the head's ε rows (docs/MATH.md §10.2).

The target is the exact posterior of ``LinearGaussianHead``: its log density and gradient cost one
(chains·C, K)×(K, K) product, so every chain uses the full data at every step (stochastic-gradient
HMC would only add gradient noise here: the data are already summarised by A and B).

* Chains run in lockstep, vectorised; each starts at the head's weights plus Gaussian noise of
  twice the diagonal-GGN standard deviations.
* Leapfrog with a mass matrix M = (L·Lᵀ)⁻¹, written as plain HMC on whitened rows z,
  Θ = Θ_ref + z·Lᵀ. L is one K×K factor shared by the C channels.
* Warm-up follows Stan's windowed adaptation: an initial buffer (15% of the warm-up, at most 75
  iterations), then slow windows that double in length from 25 iterations, a terminal buffer
  (10%, at most 50). At the end of each slow window the metric L·Lᵀ becomes the covariance of the
  window's draws (pooled over chains and channels, shrunk towards the previous metric with weight
  K/(N+K) for N pooled rows); it starts as the diagonal GGN-Laplace variances 1/(s·diag(A) + δ).
* Step size: dual averaging (Hoffman & Gelman 2014, Alg. 5: γ = 0.05, t0 = 10, κ = 0.75) of the
  mean acceptance probability over the chains towards ``target_accept``, restarted at μ = log(10·ε)
  after every metric update; the sampling phase uses the averaged step size. Each iteration draws
  its number of leapfrog steps uniformly from ⌈n/2⌉..n and jitters the step size by ±10%, so
  that no trajectory length resonates with the Gaussian's periods.
* After warm-up, ``draws`` × ``thin`` iterations, every ``thin``-th kept.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.posterior import mcmc_diagnostics
from bayesdiff_ext.posterior.linear_gaussian import LinearGaussianHead
from bayesdiff_ext.posterior.settings import HMCSettings

DUAL_AVERAGING = {"gamma": 0.05, "t0": 10.0, "kappa": 0.75}


def warmup_windows(warmup: int) -> tuple[int, list[int]]:
    """Stan's schedule: the length of the initial buffer and the iteration counts at whose end the
    metric is re-estimated (each slow window runs from the previous end, or the buffer, to its end)."""
    if warmup < 20:
        return warmup, []
    initial, terminal = min(75, int(0.15 * warmup)), min(50, int(0.1 * warmup))
    end_slow = warmup - terminal
    ends, length, start = [], 25, initial
    while start + length <= end_slow:
        if start + 3 * length > end_slow:  # a window too short to double again absorbs the rest
            length = end_slow - start
        ends.append(start + length)
        start, length = start + length, 2 * length
    return initial, ends


class _DualAveraging:
    def __init__(self, step_size: float, target: float):
        self.target, self.mu = target, math.log(10 * step_size)
        self.count, self.error, self.log_average = 0, 0.0, 0.0

    def update(self, accept: float) -> float:
        """Record one iteration's acceptance; return the next step size."""
        gamma, t0, kappa = DUAL_AVERAGING["gamma"], DUAL_AVERAGING["t0"], DUAL_AVERAGING["kappa"]
        self.count += 1
        weight = 1.0 / (self.count + t0)
        self.error = (1 - weight) * self.error + weight * (self.target - accept)
        log_step = self.mu - math.sqrt(self.count) / gamma * self.error
        decay = self.count**-kappa
        self.log_average = decay * log_step + (1 - decay) * self.log_average
        return math.exp(log_step)

    @property
    def averaged(self) -> float:
        return math.exp(self.log_average)


class _Chains:
    """The chains' state in whitened coordinates z for the current metric."""

    def __init__(self, target: LinearGaussianHead, rows: torch.Tensor, factor: torch.Tensor):
        self.target = target
        self.set_metric(rows, rows.mean(0), factor)

    def set_metric(self, rows: torch.Tensor, reference: torch.Tensor, factor: torch.Tensor) -> None:
        self.reference, self.factor = reference, factor
        self.z = torch.linalg.solve_triangular(factor, (rows - reference).transpose(-2, -1), upper=False)
        self.z = self.z.transpose(-2, -1).contiguous()
        self.log_density, self.grad = self._evaluate(self.z)

    def rows(self, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.reference + (self.z if z is None else z) @ self.factor.T

    def _evaluate(self, z):
        rows = self.rows(z)
        return self.target.log_density(rows), self.target.gradient(rows) @ self.factor

    def transition(self, step_size: float, steps: int, generator) -> tuple[torch.Tensor, int]:
        """One HMC transition of every chain; returns the acceptance probabilities and divergences."""
        momentum = torch.randn(self.z.shape, generator=generator, dtype=torch.float64)
        start_energy = -self.log_density + 0.5 * momentum.square().sum((-2, -1))
        z, grad = self.z, self.grad
        momentum = momentum + 0.5 * step_size * grad
        for i in range(steps):
            z = z + step_size * momentum
            log_density, grad = self._evaluate(z)
            momentum = momentum + (step_size if i < steps - 1 else 0.5 * step_size) * grad
        energy = -log_density + 0.5 * momentum.square().sum((-2, -1))
        log_accept = torch.nan_to_num(start_energy - energy, nan=-math.inf)
        accept = log_accept.clamp_max(0).exp()
        take = torch.rand(accept.shape, generator=generator, dtype=torch.float64) < accept
        self.z = torch.where(take[:, None, None], z, self.z)
        self.log_density = torch.where(take, log_density, self.log_density)
        self.grad = torch.where(take[:, None, None], grad, self.grad)
        return accept, int((log_accept < -1000).sum())


def _window_metric(window: list[torch.Tensor], previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean rows and the Cholesky factor of the window's pooled covariance, shrunk towards the
    previous metric (factor ``previous``) with weight K/(N+K) for N pooled rows."""
    rows = torch.stack(window)  # (n, chains, C, K)
    centred = rows - rows.mean((0, 1))
    pooled = centred.reshape(-1, rows.shape[-1])
    count, k = pooled.shape
    shrink = k / (count + k)
    covariance = (1 - shrink) * pooled.T @ pooled / (count - 1) + shrink * previous @ previous.T
    return rows.mean((0, 1)), torch.linalg.cholesky(covariance)


def _initial_step_size(chains: _Chains, generator) -> float:
    """Hoffman & Gelman's heuristic: double or halve ε until one leapfrog step's acceptance crosses ½."""
    step = 1.0
    state = (chains.z, chains.log_density, chains.grad)
    accept = float(chains.transition(step, 1, generator)[0].mean())
    direction = 1.0 if accept > 0.5 else -1.0
    for _ in range(60):
        chains.z, chains.log_density, chains.grad = state
        accept = float(chains.transition(step, 1, generator)[0].mean())
        if (accept > 0.5) != (direction > 0):
            break
        step *= 2.0**direction
    chains.z, chains.log_density, chains.grad = state
    return step


def run_hmc(
    target: LinearGaussianHead,
    settings: HMCSettings = HMCSettings(),
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Sample the head's posterior; returns draws (chains, draws, C, K) float64 and a record.

    The record holds the final step size, the mean acceptance and the divergences after warm-up,
    the number of gradient evaluations, and the diagnostics of the parameters
    (``mcmc_diagnostics.summary``: minimum/median ESS, maximum split-R̂).
    """
    chains, warmup, draws, thin = settings.chains, settings.warmup, settings.draws, settings.thin
    leapfrog_steps, target_accept = settings.leapfrog_steps, settings.target_accept
    diagonal_std = (1.0 / (target.s * target.gram.diagonal() + target.delta)).sqrt()
    start = target.theta_hat + 2 * diagonal_std * torch.randn(
        (chains, *target.theta_hat.shape), generator=generator, dtype=torch.float64
    )
    state = _Chains(target, start, torch.diag(diagonal_std))
    step = _initial_step_size(state, generator)
    adapter = _DualAveraging(step, target_accept)
    initial, window_ends = warmup_windows(warmup)
    window: list[torch.Tensor] = []
    kept, accepts, divergences, gradients = [], [], 0, 0
    for iteration in tqdm(range(warmup + draws * thin), disable=not progress, desc="HMC", unit="iteration"):
        if iteration == warmup and warmup > 0:
            step = adapter.averaged
        steps = int(torch.randint((leapfrog_steps + 1) // 2, leapfrog_steps + 1, (1,), generator=generator))
        jitter = 0.9 + 0.2 * float(torch.rand((), generator=generator, dtype=torch.float64))
        accept, diverged = state.transition(step * jitter, steps, generator)
        gradients += steps * chains
        if iteration < warmup:
            step = adapter.update(float(accept.mean()))
            if iteration >= initial:
                window.append(state.rows())
            if iteration + 1 in window_ends:
                reference, factor = _window_metric(window, state.factor)
                state.set_metric(state.rows(), reference, factor)
                step = _initial_step_size(state, generator)
                adapter, window = _DualAveraging(step, target_accept), []
            continue
        accepts.append(float(accept.mean()))
        divergences += diverged
        if (iteration - warmup + 1) % thin == 0:
            kept.append(state.rows())
    samples = torch.stack(kept, dim=1)  # (chains, draws, C, K)
    record = dict(
        step_size=step,
        accept_rate=sum(accepts) / len(accepts),
        divergences=divergences,
        gradient_evaluations=gradients,
        **mcmc_diagnostics.summary(samples.flatten(2)),
    )
    return samples, record

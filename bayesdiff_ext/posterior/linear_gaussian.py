"""The head as a linear-Gaussian model: its sufficient statistics and its exact posterior.

Write each ε channel's parameters as a row Θ_c = [w_c; b_c] of length K = D+1 (K = D without a
bias) and a ∈ R^K for a patch [φ_p; 1]. The head is linear in Θ and the likelihood Gaussian, so
with s = 1/(σ²·T), the prior N(0, δ⁻¹·I) and Δ = Θ − Θ̂ (Θ̂ the head's weights, r = f(Θ̂) − y
the fitting residuals):

    log p(Θ | data) = −s/2·[RSS + 2·⟨Δ, B⟩ + tr(Δ·A·Δᵀ)] − δ/2·‖Θ‖² + const,
    A = Σ_{n,p} a·aᵀ (the Gram matrix, K×K),   B = Σ_{n,p} r·aᵀ (C×K),   RSS = Σ r².

Everything VI, HMC and the head ensembles need is (A, B, RSS): one pass of the model over the
fitting data (``fitting.fit_on_images``, the Laplace fit's own draws) and the inference then runs
on these K×K and C×K matrices, whatever the number of images. The posterior is exactly Gaussian:
precision I_C ⊗ Λ with Λ = s·A + δ·I (the full-GGN Laplace precision) and mean
Θ* = Θ̂ − (s·B + δ·Θ̂)·Λ⁻¹, the MAP of the (s, δ) objective, which is Θ̂ only if the head was
trained to that exact optimum (docs/MATH.md §10).

Parameter vectors (``sample``, saved samples) are in laplace-torch's ``parameters_to_vector`` order:
the ε rows of the weight flattened row-major, then the ε biases.
"""

from __future__ import annotations

import math

import torch

from bayesdiff_ext.posterior import head_ops
from bayesdiff_ext.posterior.full import FullPosterior, require_ungrouped
from bayesdiff_ext.posterior.heads import HeadSpec, eps_parameters


def row_size(spec: HeadSpec) -> int:
    """K: parameters per ε channel, D weights and the bias if the head has one."""
    return spec.taps + int(spec.has_bias)


def rows_to_vector(spec: HeadSpec, rows: torch.Tensor) -> torch.Tensor:
    """(..., C, K) rows → (..., P) in laplace-torch's order [vec(W); b]."""
    weight = rows[..., : spec.taps].flatten(-2)
    if not spec.has_bias:
        return weight
    return torch.cat([weight, rows[..., spec.taps]], dim=-1)


def vector_to_rows(spec: HeadSpec, vector: torch.Tensor) -> torch.Tensor:
    """(..., P) in laplace-torch's order → (..., C, K) rows."""
    c, d = spec.eps_channels, spec.taps
    weight = vector[..., : c * d].unflatten(-1, (c, d))
    if not spec.has_bias:
        return weight
    return torch.cat([weight, vector[..., c * d :].unsqueeze(-1)], dim=-1)


def rows_to_parameters(spec: HeadSpec, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C, K) rows → (weight in ``spec.eps_weight_shape``, bias (C,) or None)."""
    weight = rows[:, : spec.taps].reshape(spec.eps_weight_shape)
    return weight, (rows[:, spec.taps] if spec.has_bias else None)


def head_rows(head: torch.nn.Module, spec: HeadSpec) -> torch.Tensor:
    """Θ̂: the head's ε weights and biases as (C, K) rows, float64 on the CPU."""
    weight, bias = eps_parameters(head, spec)
    rows = weight.reshape(spec.eps_channels, spec.taps).to("cpu", torch.float64)
    if bias is None:
        return rows
    return torch.cat([rows, bias.to("cpu", torch.float64).unsqueeze(1)], dim=1)


def residual_cross(spec: HeadSpec, phi: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """B = Σ_{n,p} r_{n,c,p}·[φ_p; 1]ᵀ, (C, K) float64: the gradient of ½‖r‖² in Θ."""
    phi = phi.to(torch.float64)
    residual = residual.to(phi.device, torch.float64)
    if spec.is_conv:
        weight = torch.nn.grad.conv2d_weight(
            phi, (spec.eps_channels, *spec.eps_weight_shape[1:]), residual, spec.stride, spec.padding, spec.dilation
        ).reshape(spec.eps_channels, spec.taps)
        bias = residual.sum(dim=(0, 2, 3))
    else:
        rows, res = phi.reshape(-1, spec.in_channels), residual.reshape(-1, spec.eps_channels)
        weight, bias = res.T @ rows, res.sum(0)
    cross = torch.cat([weight, bias.unsqueeze(1)], dim=1) if spec.has_bias else weight
    return cross.cpu()


def gram(spec: HeadSpec, phi: torch.Tensor) -> torch.Tensor:
    """A = Σ_{n,p} a·aᵀ (K, K) float64 on the CPU."""
    augmented = head_ops.patch_gram(spec, phi).to("cpu", torch.float64)
    return augmented if spec.has_bias else augmented[:-1, :-1]


class HeadStatistics:
    """Accumulates (A, B) over the fitting data; with ``bootstrap`` > 0 also for that many
    Poisson(1)-bootstrap replicates (every data point, an image at one noise draw, enters replicate
    m with a weight drawn from Poisson(1): the streaming bootstrap, so the data pass runs once).

    The bootstrap weights come from ``generator`` (a CPU generator of their own, so the data draws of
    the fit are those of the Laplace fit with the same seed). ``finish()`` returns the full-GGN
    Laplace structure of the same Gram matrix, so that a LastLayerLaplace can choose σ and δ from it.
    """

    def __init__(self, spec: HeadSpec, *, bootstrap: int = 0, generator: torch.Generator | None = None):
        require_ungrouped(spec, "linear-Gaussian inference")
        k = row_size(spec)
        self.spec = spec
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.cross = torch.zeros(spec.eps_channels, k, dtype=torch.float64)
        self.boot_gram = torch.zeros(bootstrap, k, k, dtype=torch.float64)
        self.boot_cross = torch.zeros(bootstrap, spec.eps_channels, k, dtype=torch.float64)
        self.generator = generator

    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None:
        self.gram += gram(self.spec, phi)
        self.cross += residual_cross(self.spec, phi, residual)
        if len(self.boot_gram) == 0:
            return
        counts = torch.poisson(torch.ones(len(self.boot_gram), len(phi), dtype=torch.float64), self.generator)
        for m, member_counts in enumerate(counts.to(torch.int64)):
            for k in member_counts.unique().tolist():
                if k == 0:
                    continue
                rows = (member_counts == k).nonzero().flatten().to(phi.device)
                self.boot_gram[m] += k * gram(self.spec, phi[rows])
                self.boot_cross[m] += k * residual_cross(self.spec, phi[rows], residual[rows])

    def finish(self) -> FullPosterior:
        return FullPosterior(self.spec, self.gram)


class LinearGaussianHead:
    """The exact posterior of the head's ε rows given (A, B, RSS), Θ̂, s and δ (module docstring).

    Methods work on rows Θ of shape (..., C, K) in float64; ``log_density`` and ``gradient`` are
    what HMC and the ELBO evaluate, ``posterior_mean``/``covariance`` the closed forms they must
    reproduce.
    """

    def __init__(
        self,
        spec: HeadSpec,
        gram: torch.Tensor,
        cross: torch.Tensor,
        theta_hat: torch.Tensor,
        *,
        s: float,
        delta: float,
        residual_sum_squares: float,
        residual_elements: int,
        temperature: float = 1.0,
    ):
        self.spec, self.s, self.delta = spec, float(s), float(delta)
        self.gram, self.cross, self.theta_hat = gram.to(torch.float64), cross.to(torch.float64), theta_hat
        self.residual_sum_squares, self.residual_elements = float(residual_sum_squares), int(residual_elements)
        self.temperature = float(temperature)
        k = len(self.gram)
        self.precision = self.s * self.gram + self.delta * torch.eye(k, dtype=torch.float64)

    @property
    def num_params(self) -> int:
        return self.theta_hat.numel()

    def log_density(self, rows: torch.Tensor) -> torch.Tensor:
        """log p(data | Θ)^(1/T) + log p(Θ) for every leading index of ``rows``, including constants
        (at T = 1 the ELBO is then a lower bound of the log evidence)."""
        delta_rows = rows - self.theta_hat
        quadratic = ((delta_rows @ self.gram) * delta_rows).sum((-2, -1))
        data = self.residual_sum_squares + 2 * (delta_rows * self.cross).sum((-2, -1)) + quadratic
        sigma = 1.0 / math.sqrt(self.s * self.temperature)
        normaliser = self.residual_elements / self.temperature * math.log(sigma * math.sqrt(2 * math.pi))
        log_likelihood = -0.5 * self.s * data - normaliser
        log_prior = -0.5 * self.delta * rows.square().sum((-2, -1)) + 0.5 * self.num_params * math.log(
            self.delta / (2 * math.pi)
        )
        return log_likelihood + log_prior

    def gradient(self, rows: torch.Tensor) -> torch.Tensor:
        """∇_Θ log density: −s·(B + Δ·A) − δ·Θ."""
        return -self.s * (self.cross + (rows - self.theta_hat) @ self.gram) - self.delta * rows

    def posterior_mean(self) -> torch.Tensor:
        """Θ* = Θ̂ − (s·B + δ·Θ̂)·Λ⁻¹ (C, K): the MAP and posterior mean."""
        force = self.s * self.cross + self.delta * self.theta_hat
        return self.theta_hat - torch.linalg.solve(self.precision, force.T).T

    def covariance(self) -> torch.Tensor:
        """Λ⁻¹ (K, K): the posterior covariance of every channel's row (channels are independent)."""
        return torch.linalg.inv(self.precision)

    def log_evidence(self) -> float:
        """log ∫ p(data | Θ)^(1/T)·p(Θ) dΘ, exact: the Gaussian integral around Θ*."""
        log_det = self.theta_hat.shape[0] * float(torch.linalg.slogdet(self.precision).logabsdet)
        volume = 0.5 * (self.num_params * math.log(2 * math.pi) - log_det)
        return float(self.log_density(self.posterior_mean())) + volume

    def elbo(self, mean: torch.Tensor, covariance: torch.Tensor) -> float:
        """The ELBO of q = N(mean (C, K), covariance (C, K, K) per channel), exact:
        E_q[log density] = log density(mean) − ½·Σ_c tr(Λ·S_c), H(q) = ½·Σ_c log det(2πe·S_c)."""
        expected = float(self.log_density(mean)) - 0.5 * float((covariance * self.precision).sum())
        log_det = float(torch.linalg.slogdet(covariance).logabsdet.sum())
        entropy = 0.5 * log_det + 0.5 * self.num_params * math.log(2 * math.pi * math.e)
        return expected + entropy

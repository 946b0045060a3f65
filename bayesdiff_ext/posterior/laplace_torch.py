"""Adopt a laplace-torch posterior fitted on ``Sequential(head, Flatten)`` (docs/MATH.md §1.3).

laplace-torch orders the parameters of that model as [vec(W) row-major, b] (converted with
``curvature_layout``); its curvature (H for Diag/Full, the Kron factors for Kron), σ, δ and T carry
over unchanged, and its loss (½·RSS) and
data size give the fitting statistics, so σ by maximum likelihood and the evidence stay available.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from bayesdiff_ext.posterior.curvature_layout import flat_to_channel_blocks, full_ggn_from_gram, split_flat
from bayesdiff_ext.posterior.diag import DiagPosterior
from bayesdiff_ext.posterior.fitting import FitStatistics
from bayesdiff_ext.posterior.full import FullPosterior
from bayesdiff_ext.posterior.heads import HeadSpec, eps_parameters, resolve_head
from bayesdiff_ext.posterior.kron import KronPosterior
from bayesdiff_ext.posterior.structure import PosteriorStructure


@dataclasses.dataclass(frozen=True)
class AdoptedPosterior:
    """What a fitted laplace-torch posterior carries over: its structure, curvature, σ, δ, T and
    fitting statistics, in the package's terms."""

    spec: HeadSpec
    structure: str
    curvature: str
    posterior: PosteriorStructure
    fit_stats: FitStatistics
    sigma_noise: float
    prior_precision: float
    temperature: float


def adopt(la, head: nn.Module, eps_channels: int | None) -> AdoptedPosterior:
    """Read a laplace-torch DiagLaplace/KronLaplace/FullLaplace fitted on ``Sequential(head, Flatten)``."""
    from laplace import DiagLaplace, FullLaplace, KronLaplace

    kinds = ((DiagLaplace, "diag"), (KronLaplace, "kron"), (FullLaplace, "full"))
    structure = next((name for kind, name in kinds if isinstance(la, kind)), None)
    if structure is None:
        raise TypeError(f"expected a laplace-torch DiagLaplace, KronLaplace or FullLaplace, got {type(la).__name__}")
    if not getattr(la, "n_data", 0):
        raise ValueError(f"the {type(la).__name__} is not fitted: call la.fit(...) first")
    _, spec = resolve_head(head, eps_channels=eps_channels)
    _check_parameters(la, head, spec)
    return AdoptedPosterior(
        spec=spec,
        structure=structure,
        curvature=_curvature_name(la),
        posterior=_structure(structure, la, spec),
        fit_stats=FitStatistics(
            n_images=int(la.n_data),
            n_samples=int(la.n_data),
            residual_elements=int(la.n_data) * int(la.n_outputs),
            residual_sum_squares=2.0 * float(la.loss),
        ),
        sigma_noise=float(la.sigma_noise),
        prior_precision=_scalar_prior_precision(la),
        temperature=float(la.temperature),
    )


def _structure(structure: str, la, spec: HeadSpec) -> PosteriorStructure:
    if structure == "kron":
        return KronPosterior.from_kron_factors(spec, la.H_facs.kfacs)
    h = la.H.detach().to("cpu", torch.float64)
    if structure == "diag":
        if spec.has_bias:
            return DiagPosterior(spec, *split_flat(h, spec.eps_weight_shape))
        return DiagPosterior(spec, h.reshape(spec.eps_weight_shape), None)
    return FullPosterior(spec, _gram_of_full_ggn(h, spec))


def _gram_of_full_ggn(h: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """A_aug (A without bias) from a full H that must be I_C ⊗ A_aug in laplace-torch's layout."""
    c, d = spec.eps_channels, spec.taps
    if spec.has_bias:
        gram = flat_to_channel_blocks(h, c, d)[: d + 1, : d + 1]
        rebuilt = full_ggn_from_gram(gram, c)
    else:
        gram = h[:d, :d]
        rebuilt = torch.block_diag(*[gram] * c)
    if not torch.allclose(rebuilt, h, rtol=1e-6, atol=1e-9 * float(h.abs().max())):
        raise ValueError(
            "the FullLaplace curvature is not I_C ⊗ A_aug (the GGN of a Gaussian likelihood on a linear head); "
            "only such a posterior has the closed-form factored variance. Fit it with a GGN backend."
        )
    return gram


def _check_parameters(la, head: nn.Module, spec: HeadSpec) -> None:
    if int(la.n_params) != spec.num_params:
        raise ValueError(
            f"the laplace-torch posterior has {int(la.n_params)} parameters, but the ε part of the head "
            f"{spec.shape_text()} has {spec.num_params}; fit it on Sequential(head, Flatten) of this head"
        )
    prior_mean = torch.as_tensor(la.prior_mean)
    if bool((prior_mean != 0).any()):
        raise ValueError("only a zero prior mean is supported (laplace-torch's default prior_mean=0)")
    weight, bias = eps_parameters(head, spec)
    theta = torch.cat([weight.flatten()] + ([bias] if bias is not None else [])).to(torch.float64).cpu()
    if not torch.allclose(la.mean.detach().to("cpu", torch.float64), theta, rtol=1e-5, atol=1e-7):
        warnings.warn("the laplace-torch posterior's mean differs from the head's weights", stacklevel=3)


def _scalar_prior_precision(la) -> float:
    prior = torch.as_tensor(la.prior_precision).flatten()
    if not bool((prior == prior[0]).all()):
        raise ValueError(
            f"only a scalar prior precision is supported, the laplace-torch posterior has {prior.numel()} values"
        )
    return float(prior[0])


def _curvature_name(la) -> str:
    backend = type(la.backend).__name__.lower()
    return "ef" if backend.endswith("ef") else "ggn"

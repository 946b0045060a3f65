"""laplace-torch (0.3) posteriors over a Conv2d or Linear head → inputs of the fused head ops.

laplace-torch orders a head's parameters as ``parameters_to_vector``: vec(W) row-major (so weight
c's D = C_in·kh·kw entries are contiguous, in ``weight.flatten(1)`` order), then the bias (C).
A conv head is fitted as ``Sequential(head, Flatten)`` (its last-layer mode accepts only Linear
heads, docs/MATH.md §1.3); Flatten of NCHW makes output k = c·H·W + p, which the ops' NCHW outputs
flatten to. Each function returns a dict to splat into the op (the conv geometry included):

    ops.conv_head_mean_var(phi, **diag_from_laplace(la, head))          # conv head
    ops.linear_head_mean_var(phi, **diag_from_laplace(la, head))        # Linear head
    ops.conv_head_var_factored(phi, **full_from_laplace(la, head))      # conv head (kron alike)

For a Linear head the factored dicts hold 1×1 directions (R, D, 1, 1) and no geometry: apply them
to ``phi.reshape(-1, D, 1, 1)``.

Only a channel's own diagonal block of the covariance enters its variance (the Jacobian of output c
is zero outside c's weights), so ``factored_from_covariance`` is exact for any full posterior: one
shared set of D+1 directions when all channel blocks are equal (the GGN of a Gaussian likelihood,
I_C ⊗ A_aug), else one set per channel selected by ``mix``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "diag_from_laplace",
    "factored_from_covariance",
    "factored_from_kron",
    "full_from_laplace",
    "kron_from_laplace",
]


def _head_layout(head: nn.Module) -> tuple[tuple[int, ...], bool]:
    if not isinstance(head, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"`head` must be an nn.Conv2d or nn.Linear, got {type(head).__name__}")
    return tuple(head.weight.shape), head.bias is not None


def _geometry(head: nn.Module, with_groups: bool) -> dict:
    if not isinstance(head, nn.Conv2d):
        return {}
    if isinstance(head.padding, str):
        raise ValueError(f"string padding {head.padding!r} is not supported; give the head explicit padding")
    geometry = dict(stride=tuple(head.stride), padding=tuple(head.padding), dilation=tuple(head.dilation))
    if with_groups:
        geometry["groups"] = head.groups
    elif head.groups != 1:
        raise ValueError(f"factored posteriors need an ungrouped head, this one has groups={head.groups}")
    return geometry


def _split(flat: torch.Tensor, weight_shape, has_bias: bool, name: str):
    weight_numel = math.prod(weight_shape)
    expected = weight_numel + (weight_shape[0] if has_bias else 0)
    if flat.shape != (expected,):
        raise ValueError(
            f"`{name}` has {flat.numel()} parameters but a head with weight {tuple(weight_shape)} "
            f"{'and' if has_bias else 'without'} bias has {expected}; fit laplace-torch on Sequential(head, Flatten) "
            "(conv) or with subset_of_weights='last_layer' (Linear)"
        )
    weight = flat[:weight_numel].reshape(weight_shape)
    return weight, (flat[weight_numel:] if has_bias else None)


def _directions(columns: torch.Tensor, weight_shape) -> torch.Tensor:
    """(D, R) direction columns → conv filters (R, C_in, kh, kw), or (R, D, 1, 1) for a Linear head."""
    filter_shape = weight_shape[1:] if len(weight_shape) == 4 else (weight_shape[1], 1, 1)
    return columns.T.contiguous().reshape(columns.shape[1], *filter_shape)


def diag_from_laplace(la, head: nn.Module) -> dict:
    """A ``DiagLaplace`` → ``weight``/``bias`` (the posterior mean) and ``weight_var``/``bias_var``.

    Feeds ``ops.conv_head_mean_var`` (conv heads, geometry and groups included) or
    ``ops.linear_head_mean_var`` (Linear heads). ``la.posterior_variance`` already carries the
    backend's curvature convention (EF backends: 2× the per-sample squared gradients), so no
    factor is applied here.
    """
    weight_shape, has_bias = _head_layout(head)
    weight, bias = _split(la.mean.detach(), weight_shape, has_bias, "la.mean")
    weight_var, bias_var = _split(la.posterior_variance.detach(), weight_shape, has_bias, "la.posterior_variance")
    inputs = dict(weight=weight, bias=bias, weight_var=weight_var, bias_var=bias_var)
    return inputs | _geometry(head, with_groups=True)


def factored_from_covariance(covariance: torch.Tensor, weight_shape, has_bias: bool) -> dict:
    """A full covariance over [vec(W); b] → ``proj_weight``, ``proj_bias``, ``mix``, ``bias_var``.

    var[c,p] = z_pᵀ Σ_cc z_p with z_p = [φ_p; 1] and Σ_cc channel c's block; with Σ_cc = L Lᵀ,
    z_pᵀ Σ_cc z_p = ‖Lᵀ z_p‖², so the directions are the columns of L (their last row the offsets).
    """
    channels, taps = weight_shape[0], math.prod(weight_shape[1:])
    block = taps + (1 if has_bias else 0)
    if covariance.shape != (channels * block, channels * block):
        raise ValueError(
            f"`covariance` must be ({channels * block}, {channels * block}) for weight {tuple(weight_shape)}, "
            f"got {tuple(covariance.shape)}"
        )
    index = torch.arange(channels, device=covariance.device).unsqueeze(1) * taps + torch.arange(taps, device=covariance.device)
    if has_bias:
        index = torch.cat([index, channels * taps + torch.arange(channels, device=covariance.device).unsqueeze(1)], dim=1)
    blocks = torch.stack([covariance[i][:, i] for i in index])  # (C, D', D')
    scale = blocks.abs().amax()
    tolerance = 64 * torch.finfo(covariance.dtype).eps * scale
    shared = bool(((blocks - blocks[:1]).abs() <= tolerance).all())
    factors = torch.linalg.cholesky(blocks[:1] if shared else blocks)  # (C or 1, D', D')
    columns = torch.cat(list(factors), dim=1)  # (D', R)
    rank = columns.shape[1]
    if shared:
        mix = covariance.new_ones(channels, rank)
    else:
        mix = torch.block_diag(*[covariance.new_ones(1, block)] * channels)
    return dict(
        proj_weight=_directions(columns[:taps], weight_shape),
        proj_bias=columns[taps].contiguous() if has_bias else None,
        mix=mix,
        bias_var=None,
    )


def full_from_laplace(la, head: nn.Module) -> dict:
    """A ``FullLaplace`` → inputs of ``ops.conv_head_var_factored`` (R = D+1 for a GGN posterior)."""
    weight_shape, has_bias = _head_layout(head)
    geometry = _geometry(head, with_groups=False)
    return factored_from_covariance(la.posterior_covariance.detach(), weight_shape, has_bias) | geometry


def factored_from_kron(eigenvectors, eigenvalues, deltas, weight_shape, has_bias: bool, damping: bool = False) -> dict:
    """A decomposed KFAC posterior precision (laplace-torch's ``KronDecomposed``) → factored inputs.

    ``eigenvectors``/``eigenvalues``: [[Q_G, Q_A], [Q_b]] / [[g, a], [g_b]] (the bias block only
    with a bias), G over the C outputs and A over the D inputs of the row-major weight, with the
    likelihood scale already in the eigenvalues; ``deltas``: the prior precision of each block.
    Undamped, the weight block's covariance is Σ_ij Q_G,i Q_G,iᵀ ⊗ Q_A,j Q_A,jᵀ / (g_i a_j + δ), so

        mix[c,j] = Σ_i Q_G[c,i]² / (g_i a_j + δ),   directions q_j = Q_A[:, j],
        bias_var[c] = Σ_i Q_b[c,i]² / (g_b,i + δ_b);

    damped, the denominator is (g_i + √δ)(a_j + √δ), as in laplace-torch's ``KronDecomposed``.
    """
    channels, taps = weight_shape[0], math.prod(weight_shape[1:])
    blocks = 2 if has_bias else 1
    if len(eigenvectors) != blocks or len(eigenvalues) != blocks:
        raise ValueError(f"expected {blocks} Kronecker block(s) (weight{', bias' if has_bias else ''}), got {len(eigenvectors)}")
    (q_out, q_in), (g, a) = eigenvectors[0], eigenvalues[0]
    if q_out.shape != (channels, channels) or q_in.shape != (taps, taps):
        raise ValueError(
            f"the weight block's factors must be ({channels}, {channels}) ⊗ ({taps}, {taps}), "
            f"got {tuple(q_out.shape)} ⊗ {tuple(q_in.shape)}"
        )
    deltas = torch.as_tensor(deltas, dtype=g.dtype, device=g.device).reshape(-1).expand(blocks)
    delta = deltas[0]
    if damping:
        denominator = torch.outer(g + delta.sqrt(), a + delta.sqrt())
    else:
        denominator = torch.outer(g, a) + delta
    mix = (q_out * q_out) @ denominator.reciprocal()
    bias_var = None
    if has_bias:
        (q_bias,), (g_bias,) = eigenvectors[1], eigenvalues[1]
        bias_var = (q_bias * q_bias) @ (g_bias + deltas[1]).reciprocal()
    return dict(proj_weight=_directions(q_in, weight_shape), proj_bias=None, mix=mix, bias_var=bias_var)


def kron_from_laplace(la, head: nn.Module) -> dict:
    """A ``KronLaplace`` → inputs of ``ops.conv_head_var_factored`` (R = D directions).

    Uses ``la.posterior_precision``, the object laplace-torch's predictive uses. In 0.3 its damping
    flag is always False (``KronLaplace(damping=True)`` damps ``la.H`` but adding the prior drops
    the flag), so the predictive is the undamped one either way; this follows the same object.
    """
    weight_shape, has_bias = _head_layout(head)
    geometry = _geometry(head, with_groups=False)
    precision = la.posterior_precision
    inputs = factored_from_kron(
        [[q.detach() for q in qs] for qs in precision.eigenvectors],
        [[v.detach() for v in vs] for vs in precision.eigenvalues],
        precision.deltas.detach(),
        weight_shape,
        has_bias,
        damping=bool(precision.damping),
    )
    return inputs | geometry

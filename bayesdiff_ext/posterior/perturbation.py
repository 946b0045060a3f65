"""Run a model with a different ε-head weight vector in every row of its batch, by a forward hook.

Trajectory Monte Carlo (docs/MATH.md §2.3) sends M·B rows through the model at once, row r with its
own head parameters θ_r = θ_MAP + Δθ_r. The model is never modified: a forward hook on the head
adds the output of the perturbation, head(φ_r; Δθ_r), to the ε channels of the head's output. The
head is linear in its parameters, so head(φ; θ_MAP) + head(φ; Δθ) = head(φ; θ_MAP + Δθ) up to
round-off. The perturbations of all rows are applied in one op: a grouped convolution with one
group per row (conv heads) or a batched matrix product (Linear heads).

When the head sees k·R rows for R perturbations (classifier-free guidance runs the [uncond; cond]
rows of every trajectory through one call), the perturbations are tiled k times, copy-major: both
branches of a trajectory share its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bayesdiff_ext.posterior.heads import HeadSpec

__all__ = ["head_perturbation", "perturbed_head", "split_parameters"]


def split_parameters(spec: HeadSpec, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, P) parameter vectors (``parameters_to_vector`` order) → weights (R, *W_eps) and biases (R, C_eps)."""
    rows, weight_numel = vectors.shape[0], spec.eps_channels * spec.taps
    if vectors.dim() != 2 or vectors.shape[1] != spec.num_params:
        raise ValueError(f"parameter vectors must have shape (R, {spec.num_params}), got {tuple(vectors.shape)}")
    weight = vectors[:, :weight_numel].reshape(rows, *spec.eps_weight_shape)
    bias = vectors[:, weight_numel:] if spec.has_bias else None
    return weight, bias


def head_perturbation(spec: HeadSpec, phi: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """head(φ_r; Δθ_r) for every row r: the ε channels' output of each row's parameter vector.

    Args:
        spec (`HeadSpec`): the head's geometry.
        phi (`torch.Tensor`): the head's input, R rows (conv: (R, C_in, H, W); Linear: (R, ..., C_in)).
        vectors (`torch.Tensor` of shape `(R, P)`): one parameter vector per row.

    Returns:
        `torch.Tensor`: (R, C_eps, H_out, W_out) for a conv head, (R, ..., C_eps) for a Linear head.
    """
    rows = phi.shape[0]
    if vectors.shape[0] != rows:
        raise ValueError(f"{vectors.shape[0]} parameter vectors for {rows} rows of φ")
    weight, bias = split_parameters(spec, vectors.to(phi.dtype))
    if spec.is_conv:
        out = F.conv2d(
            phi.reshape(1, rows * phi.shape[1], *phi.shape[2:]),
            weight.flatten(0, 1),
            None if bias is None else bias.flatten(),
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            groups=rows * spec.groups,
        )
        return out.reshape(rows, spec.eps_channels, *out.shape[2:])
    flat = phi.reshape(rows, -1, phi.shape[-1])
    out = torch.bmm(flat, weight.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None, :]
    return out.reshape(*phi.shape[:-1], spec.eps_channels)


@contextlib.contextmanager
def perturbed_head(head: nn.Module, spec: HeadSpec, deviations: torch.Tensor) -> Iterator[None]:
    """Inside the context, row r of every forward through ``head`` uses θ_head + ``deviations[r]``.

    ``deviations`` (R, P) are Δθ in ``parameters_to_vector`` order; a forward with k·R rows gets
    them tiled k times. The hook is removed on exit, also when the body raises.
    """
    count = deviations.shape[0]

    def hook(module, args, output):
        phi = args[0]
        if phi.shape[0] % count:
            raise RuntimeError(f"the head saw {phi.shape[0]} rows, not a multiple of the {count} weight draws")
        tiled = deviations.repeat(phi.shape[0] // count, 1)
        delta = head_perturbation(spec, phi, tiled).to(output.dtype)
        channel_dim = 1 if spec.is_conv else -1
        if spec.eps_channels == output.shape[channel_dim]:
            return output + delta
        rest = output.narrow(channel_dim, spec.eps_channels, output.shape[channel_dim] - spec.eps_channels)
        eps = output.narrow(channel_dim, 0, spec.eps_channels) + delta
        return torch.cat([eps, rest], dim=channel_dim)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

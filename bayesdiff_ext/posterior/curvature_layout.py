"""Parameter orders of a Conv2d head's curvature: laplace-torch's flat layout and ours.

laplace-torch (0.3) orders the head's parameters as ``parameters_to_vector``: the weight
row-major, vec(W) of length C·D with D = C_in·kh·kw, then the bias (C). Our accumulators work on
per-channel blocks [W_c; b_c] of length D+1, in which the exact GGN is I_C ⊗ A_aug
(``ops.conv_patch_gram``). The helpers below convert between the two and rebuild laplace-torch's
curvature from the accumulators:

* diag GGN: ``DiagLaplace.H`` = [h broadcast over the C output channels; N·P for every bias],
  h = ``ops.conv_diag_ggn`` (BackPackGGN and CurvlinopsGGN alike).
* diag EF: ``DiagLaplace.H`` = 2 × [``ops.conv_diag_ef`` weight part; its bias part] (BackPackEF and
  CurvlinopsEF square gradients of the sum of squares without the ½).
* full GGN: ``FullLaplace.H`` = ``full_ggn_from_gram(A_aug, C)``.
* KFAC: see ``laplace_kron_factors``.

P = H_out·W_out positions per image, N images; N·P is A_aug[D, D].
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "channel_block_permutation",
    "channel_blocks_to_flat",
    "diag_ggn_flat",
    "flat_to_channel_blocks",
    "full_ggn_from_gram",
    "join_flat",
    "laplace_kron_factors",
    "split_flat",
]


def channel_block_permutation(out_channels: int, patch_size: int, device=None) -> torch.Tensor:
    """Indices `perm` with ``flat[perm]`` = the channel-block order [W_0; b_0; W_1; b_1; …]."""
    channel = torch.arange(out_channels, device=device).unsqueeze(1)
    weight = channel * patch_size + torch.arange(patch_size, device=device)
    bias = out_channels * patch_size + channel
    return torch.cat([weight, bias], dim=1).flatten()


def _permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Permute a vector, or both axes of a square matrix."""
    if x.dim() == 1:
        return x[index]
    if x.dim() == 2 and x.shape[0] == x.shape[1]:
        return x[index][:, index]
    raise ValueError(f"expected a vector or a square matrix, got shape {tuple(x.shape)}")


def flat_to_channel_blocks(x: torch.Tensor, out_channels: int, patch_size: int) -> torch.Tensor:
    """laplace-torch's [vec(W); b] order → channel blocks [W_c; b_c], for a vector or a matrix."""
    return _permute(x, channel_block_permutation(out_channels, patch_size, x.device))


def channel_blocks_to_flat(x: torch.Tensor, out_channels: int, patch_size: int) -> torch.Tensor:
    """Channel blocks [W_c; b_c] → laplace-torch's [vec(W); b] order, for a vector or a matrix."""
    inverse = torch.argsort(channel_block_permutation(out_channels, patch_size, x.device))
    return _permute(x, inverse)


def split_flat(flat: torch.Tensor, weight_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat per-parameter vector (e.g. ``la.posterior_variance``) → (weight-shaped, bias (C,))."""
    weight_numel = math.prod(weight_shape)
    expected = weight_numel + weight_shape[0]
    if flat.shape != (expected,):
        raise ValueError(
            f"`flat` must have shape ({expected},) for weight shape {tuple(weight_shape)}, "
            f"got {tuple(flat.shape)}"
        )
    return flat[:weight_numel].view(*weight_shape), flat[weight_numel:]


def join_flat(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(weight-shaped, bias) → laplace-torch's flat [vec(W); b]."""
    return torch.cat([weight.flatten(), bias.flatten()])


def diag_ggn_flat(ggn: torch.Tensor, total_positions: int, out_channels: int) -> torch.Tensor:
    """``ops.conv_diag_ggn``'s (C_in, kh, kw) → the flat GGN diagonal of all C·(D+1) parameters.

    ``total_positions`` is N·H_out·W_out, the bias's GGN diagonal.
    """
    weight = ggn.unsqueeze(0).expand(out_channels, *ggn.shape)
    return join_flat(weight, ggn.new_full((out_channels,), float(total_positions)))


def full_ggn_from_gram(gram: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The exact GGN of ½‖f − y‖², I_C ⊗ A_aug, in laplace-torch's [vec(W); b] order."""
    blocks = torch.block_diag(*([gram] * out_channels))
    return channel_blocks_to_flat(blocks, out_channels, gram.shape[0] - 1)


def laplace_kron_factors(
    gram: torch.Tensor, out_channels: int, n_images: int, backend: str
) -> list[list[torch.Tensor]]:
    """laplace-torch's fitted KFAC factors (``KronLaplace.H_facs.kfacs``) from A_aug.

    For a Conv2d head fitted with likelihood='regression', laplace-torch forms the weight block as
    G ⊗ A (output ⊗ input, acting on row-major vec(W)) and the bias as a separate block G_b: the
    bias is *not* augmented into A. With A_D = A_aug[:D, :D], N images and N·P = A_aug[D, D]:

    * ``"curvlinops"`` (CurvlinopsGGN): G = √2·N·P·I_C, A = A_D / (√2·N·P), so G ⊗ A = I_C ⊗ A_D, the
      exact weight GGN.
    * ``"backpack"`` (BackPackGGN, KFLR): G = √2·N·P·I_C, A = A_D / (√2·N), so G ⊗ A = P·(I_C ⊗ A_D):
      P times the exact weight GGN (its input factor is not averaged over positions).
    * both: G_b = N·P·I_C, the exact bias GGN.

    The √2 comes from laplace's likelihood factor ½ spread as √½ over each of the two factors of
    the 2·I output Hessian of its sum-of-squares loss. Per-batch rescaling by M/N makes the sums over
    a DataLoader's batches equal to these whatever the batch sizes. ``damping`` only changes the
    decomposition, not these factors.
    """
    patch_size = gram.shape[0] - 1
    total_positions = gram[patch_size, patch_size]
    eye = torch.eye(out_channels, dtype=gram.dtype, device=gram.device)
    input_block = gram[:patch_size, :patch_size]
    if backend == "curvlinops":
        input_factor = input_block / (math.sqrt(2.0) * total_positions)
    elif backend == "backpack":
        input_factor = input_block / (math.sqrt(2.0) * n_images)
    else:
        raise ValueError(f"`backend` must be 'curvlinops' or 'backpack', got {backend!r}")
    return [[math.sqrt(2.0) * total_positions * eye, input_factor], [total_positions * eye]]

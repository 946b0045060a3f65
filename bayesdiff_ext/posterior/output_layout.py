"""Where a token-wise Linear head's outputs land in the model's output: the unpatchify (docs/MATH.md §8).

DiT, PixArt and SD3 transformers end in a Linear head on tokens, (B, N, D) → (B, N, p²·C_out),
and then unpatchify: the N = h·w tokens are a grid, each token's p·p·C_out outputs a p×p patch of
C_out channels,

    (B, h, w, p, p, C_out) --einsum nhwpqc->nchpwq--> (B, C_out, h·p, w·p).

That is a permutation of the head's outputs, so the head's per-output variance moves with the same
reshape; :class:`PatchLayout` computes on tokens and permutes exactly as the models do. Learned-σ
models (C_out = 2·C) keep the first C channels of each patch: the head rows (i, j, c) with c < C,
in their order, are the ε rows of the posterior. Flux's transformer returns its tokens as they
are (its pipeline packs 2×2 latent patches into tokens and unpacks after sampling), so its head's
output *is* the model's output and needs no layout: a variance of the packed tokens unpacks with
the pipeline's own ``_unpack_latents`` like the latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bayesdiff_ext.posterior.heads import TRANSFORMER_HEADS, HeadSpec, head_spec, locate_head, resolve_head

__all__ = ["PatchLayout", "describe_head", "output_layout"]

# Transformers whose output is their head's output unpatchified.
_UNPATCHIFYING = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")


@dataclass(frozen=True)
class PatchLayout:
    """The unpatchify of a patch transformer: ``patch_size`` p, ``out_channels`` per patch, of which the
    leading ``eps_channels`` are ε."""

    patch_size: int
    out_channels: int
    eps_channels: int

    def __post_init__(self) -> None:
        if not 0 < self.eps_channels <= self.out_channels:
            raise ValueError(
                f"eps_channels must be in 1..{self.out_channels} (the model's output channels), got {self.eps_channels}"
            )

    @property
    def head_outputs(self) -> int:
        """Outputs of the head per token, p²·C_out."""
        return self.patch_size**2 * self.out_channels

    def eps_rows(self) -> tuple[int, ...] | None:
        """The head rows that are ε, in token-output order (None when all of them are)."""
        if self.eps_channels == self.out_channels:
            return None
        patch = range(self.patch_size**2)
        return tuple(pixel * self.out_channels + c for pixel in patch for c in range(self.eps_channels))

    def grid(self, sample_shape: torch.Size) -> tuple[int, int]:
        """(h, w) of the token grid for a model input of ``sample_shape`` (B, C, H, W)."""
        height, width = sample_shape[-2:]
        return height // self.patch_size, width // self.patch_size

    def to_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, p²·C) head outputs on the token grid → (B, C, h·p, w·p), as the models unpatchify."""
        batch, height, width = tokens.shape[:3]
        p = self.patch_size
        patches = tokens.reshape(batch, height, width, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(batch, -1, height * p, width * p)

    def to_tokens(self, output: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_output`: (B, C, H, W) → (B, H/p, W/p, p²·C)."""
        batch, channels, height, width = output.shape
        p = self.patch_size
        patches = output.reshape(batch, channels, height // p, p, width // p, p)
        return torch.einsum("nchpwq->nhwpqc", patches).reshape(batch, height // p, width // p, p * p * channels)


def output_layout(model: nn.Module, head: nn.Module, eps_channels: int | None) -> PatchLayout | None:
    """The :class:`PatchLayout` of a DiT/PixArt/SD3 transformer's own head, None for any other head.

    ``eps_channels``: the model's output channels that are ε (default: half of them for a
    learned-σ model, out_channels = 2·in_channels, otherwise all).
    """
    name = type(model).__name__
    if name not in _UNPATCHIFYING or head is not getattr(model, TRANSFORMER_HEADS[name]):
        return None
    config = model.config
    out_channels = model.out_channels
    if eps_channels is None:
        eps_channels = config.in_channels if out_channels == 2 * config.in_channels else out_channels
    return PatchLayout(config.patch_size, out_channels, eps_channels)


def describe_head(
    model: nn.Module, head: nn.Module | None, eps_channels: int | None
) -> tuple[nn.Module, HeadSpec, PatchLayout | None]:
    """The head of ``model``, its spec (the ε outputs of the head) and its output layout.

    ``eps_channels`` counts the model's output channels that are ε; for a patch transformer the
    head's ε rows follow from it (p² per channel).
    """
    head = locate_head(model, head)
    layout = output_layout(model, head, eps_channels)
    if layout is not None:
        return head, head_spec(head, layout.patch_size**2 * layout.eps_channels, layout.eps_rows()), layout
    return (*resolve_head(model, head, eps_channels), None)

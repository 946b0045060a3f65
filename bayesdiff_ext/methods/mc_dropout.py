"""MC dropout (Gal & Ghahramani 2016) for a diffusion UNet trained with dropout.

Each of the T passes samples from the same x_T with the UNet's dropout layers active (every UNet
call of a pass draws fresh masks, as a sampled network would at each step); nothing else changes
mode (the UNet has GroupNorm, no batch norm). Pass k seeds the dropout masks with ``seed + k``
inside a forked RNG, so a run is reproducible and the global RNG is left as it was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bayesdiff_ext.methods.repeated import RepeatedSampler
from bayesdiff_ext.validation import check_count

__all__ = ["MCDropoutSampler", "active_dropout"]


def _dropout_layers(unet: nn.Module) -> list[nn.Dropout]:
    return [m for m in unet.modules() if isinstance(m, nn.Dropout) and m.p > 0]


@contextlib.contextmanager
def active_dropout(unet: nn.Module):
    """Dropout layers in training mode for the duration; their modes come back after."""
    layers = _dropout_layers(unet)
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        yield unet
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode


class MCDropoutSampler(RepeatedSampler):
    """``passes`` = T samples with dropout on; ``images`` come from the UNet with dropout off."""

    method = "mc-dropout"

    def __init__(self, unet, scheduler, passes: int = 10, seed: int = 0) -> None:
        passes = check_count("passes", passes, minimum=2)
        if not _dropout_layers(unet):
            raise ValueError(
                "the UNet has no dropout layer with p > 0, so MC dropout would give zero variance; train "
                "one with dropout (e.g. python/train_digits.py --dropout 0.1, loaded by "
                "bayesdiff_ext.digits.load_bundled_unet(dropout=True))"
            )
        super().__init__(unet, scheduler)
        self.num_passes, self.seed = passes, int(seed)

    def settings(self):
        rates = sorted({m.p for m in _dropout_layers(self.reference_unet)})
        return dict(dropout_rates=rates, seed=self.seed)

    def passes(self):
        device = self.reference_unet.device
        for k in range(self.num_passes):
            yield self._pass(k, device)

    @contextlib.contextmanager
    def _pass(self, k: int, device: torch.device):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + k)
            with active_dropout(self.reference_unet) as unet:
                yield unet

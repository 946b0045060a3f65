"""MC dropout (Gal & Ghahramani 2016) for a diffusion UNet trained with dropout.

Each of the T passes samples from the same x_T with the UNet's dropout layers active (every UNet
call of a pass draws fresh masks, as a sampled network would at each step); nothing else changes
mode (the UNet has GroupNorm, no batch norm). With one generator per image (the command line's
``image_generators(seed, indices)``), image b's masks in pass k come from its own stream
(``'dropout'``, ``seed``, k) of :mod:`bayesdiff_ext.randomness` (:func:`image_dropout`), so its
score is the same in any batch; with a single generator (or None) pass k seeds the batch's masks
with ``seed + k`` inside a forked RNG. Either way a run is reproducible and the global RNG is left
as it was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bayesdiff_ext.methods.repeated import RepeatedSampler
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.scheduler_loop import generator_device
from bayesdiff_ext.validation import check_count

__all__ = ["MCDropoutSampler", "active_dropout", "image_dropout"]


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


@contextlib.contextmanager
def image_dropout(unet: nn.Module, generators: list[torch.Generator]):
    """The UNet's dropout with one mask stream per image, for the duration.

    Row r of every model call keeps each unit with probability 1 − p by a draw from
    ``generators[r mod B]`` (B = ``len(generators)``; the rows are the B images, or copies of them
    laid out copy-major) and scales it by 1/(1 − p), as ``nn.Dropout`` does in training; the layers
    themselves stay in eval mode (their modes come back after)."""
    layers = _dropout_layers(unet)
    batch = len(generators)

    def masked(module, inputs, output):
        x = inputs[0]
        if x.shape[0] % batch:
            raise ValueError(f"a model call of {x.shape[0]} rows cannot take its dropout masks from {batch} images' streams")
        keep = 1.0 - module.p
        masks = torch.stack(
            [torch.rand(x.shape[1:], generator=generators[r % batch], device=generators[r % batch].device) < keep
             for r in range(x.shape[0])]
        )
        return x * masks.to(x.device, x.dtype) / keep

    modes = [m.training for m in layers]
    handles = []
    try:
        for m in layers:
            m.eval()
            handles.append(m.register_forward_hook(masked))
        yield unet
    finally:
        for handle in handles:
            handle.remove()
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

    def passes(self, generator, batch: int):
        if isinstance(generator, list):  # per-image streams: the masks follow the image
            device = generator_device(generator, self.reference_unet.device)
            streams = [ImageStreams.derived(generator, batch, device, "dropout", self.seed, k) for k in range(self.num_passes)]
            return [image_dropout(self.reference_unet, s.generators) for s in streams]
        device = self.reference_unet.device
        return [self._pass(k, device) for k in range(self.num_passes)]

    @contextlib.contextmanager
    def _pass(self, k: int, device: torch.device):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + k)
            with active_dropout(self.reference_unet) as unet:
                yield unet

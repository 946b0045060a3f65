"""Share one image trajectory between methods: record the UNet body's output φ once, replay it.

Every method of the evaluation samples the same images (same x_T, deterministic image path), so
the UNet body — the cost — is identical for all of them; only the head and the moment recurrence
differ. ``RecordingUNet`` runs the real UNet and keeps, per call, its input and the head's input
φ; ``ReplayUNet`` answers a call whose input equals the next recorded one with the recorded
output, after passing the recorded φ through the real head so that the posterior's capture hook
fires as usual, and any other call (Monte Carlo samples of x_t) with the real UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from bayesdiff_ext.posterior import capture_head_input

__all__ = ["RecordedCall", "RecordingUNet", "ReplayUNet"]


@dataclass
class RecordedCall:
    x: torch.Tensor
    timestep: int
    phi: torch.Tensor
    output: torch.Tensor


class _UNetFacade(nn.Module):
    """A module around the real UNet that the sampler calls like the UNet (``forward(sample, timestep, ...)``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config


class RecordingUNet(_UNetFacade):
    """Calls the real UNet and records (input, timestep, φ, output) of every call in ``calls``."""

    def __init__(self, unet: nn.Module, head: nn.Module):
        super().__init__(unet)
        self.head = head
        self.calls: list[RecordedCall] = []

    def forward(self, sample, timestep, **kwargs):
        with capture_head_input(self.head) as cap:
            out = self.unet(sample, timestep, **kwargs).sample
        self.calls.append(RecordedCall(sample.clone(), int(timestep), cap.phi.clone(), out.clone()))
        return SimpleNamespace(sample=out)


class ReplayUNet(_UNetFacade):
    """Replays recorded calls in order where the input matches exactly; runs the UNet otherwise.

    ``replayed`` and ``computed`` count the two kinds of calls; after a run, ``replayed`` equal to
    the number of recorded calls proves the run followed the recorded image path. ``rows`` selects
    the images of the recorded batch that this run samples (all by default).
    """

    def __init__(
        self, unet: nn.Module, head: nn.Module, calls: list[RecordedCall], rows: slice = slice(None)
    ):
        super().__init__(unet)
        self.head = head
        self.calls = calls
        self.rows = rows
        self.replayed = 0
        self.computed = 0

    def forward(self, sample, timestep, **kwargs):
        if self.replayed < len(self.calls):
            call = self.calls[self.replayed]
            recorded = call.x[self.rows]
            if call.timestep == int(timestep) and recorded.shape == sample.shape and torch.equal(recorded, sample):
                self.replayed += 1
                self.head(call.phi[self.rows])  # the capture hook records φ, as in the real forward
                return SimpleNamespace(sample=call.output[self.rows])
        self.computed += 1
        return SimpleNamespace(sample=self.unet(sample, timestep, **kwargs).sample)

"""Deep ensembles (Lakshminarayanan et al. 2017): K independently trained UNets, same x_T."""

from __future__ import annotations

import contextlib

from bayesdiff_ext.methods.repeated import RepeatedSampler

__all__ = ["EnsembleSampler"]


class EnsembleSampler(RepeatedSampler):
    """One pass per member; ``images`` are member 0's samples, ``mean`` the members' average."""

    method = "ensemble"

    def __init__(self, unets, scheduler) -> None:
        unets = list(unets)
        if len(unets) < 2:
            raise ValueError(f"an ensemble needs at least 2 UNets, got {len(unets)}")
        configs = [(u.config.in_channels, u.config.sample_size, u.config.out_channels) for u in unets]
        if len(set(configs)) != 1:
            raise ValueError(
                f"ensemble members must share (in_channels, sample_size, out_channels), got {configs}"
            )
        super().__init__(unets[0], scheduler)
        self.members = unets

    def settings(self):
        return dict(members=len(self.members))

    def passes(self, generator, batch: int):
        return [contextlib.nullcontext(unet) for unet in self.members]

"""Scores of the alternatives issue's methods that sample other UNets from the same x_T.

MC dropout (T passes of the bundled dropout-trained UNet) and a deep ensemble (the three
independently trained members), through ``bayesdiff_ext.methods``. Their spread is a score for
x_T, i.e. for the image our model makes from it; the methods run only where their weights exist.
"""

from __future__ import annotations

import torch

from bayesdiff_ext import aggregation

__all__ = ["ENSEMBLE_MEMBERS", "REPEATED", "available_repeated", "repeated_scores"]

REPEATED = ("mc_dropout", "ensemble")
ENSEMBLE_MEMBERS = 3


def available_repeated() -> tuple[str, ...]:
    from bayesdiff_ext.digits import bundled_dir

    root = bundled_dir()
    present = {
        "mc_dropout": (root / "unet_dropout" / "config.json").is_file(),
        "ensemble": all(
            (root / "ensemble" / f"member_{k}" / "unet" / "config.json").is_file()
            for k in range(ENSEMBLE_MEMBERS)
        ),
    }
    return tuple(name for name in REPEATED if present[name])


def _sampler(name: str, config, scheduler):
    from bayesdiff_ext.digits import load_bundled_unet
    from bayesdiff_ext.methods import EnsembleSampler, MCDropoutSampler

    if name == "mc_dropout":
        return MCDropoutSampler(
            load_bundled_unet(dropout=True), scheduler, passes=config.dropout_passes, seed=config.seed
        )
    if name == "ensemble":
        return EnsembleSampler(
            [load_bundled_unet(ensemble_member=k) for k in range(ENSEMBLE_MEMBERS)], scheduler
        )
    raise ValueError(f"unknown repeated method {name!r}; valid: {REPEATED}")


def repeated_scores(name: str, config, scheduler, noise: torch.Tensor, progress: bool) -> torch.Tensor:
    """Σ of the epistemic variance (the passes' spread) of x_0 per image (B,), in batches."""
    sampler = _sampler(name, config, scheduler)
    scores = []
    for batch in noise.split(config.batch_size):
        out = sampler.sample(noise=batch, num_inference_steps=config.steps, progress=progress)
        scores.append(aggregation.score_sum(out.epistemic_variance))
    return torch.cat(scores)

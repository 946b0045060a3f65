"""Laplace hyperparameter sweep: σ and prior precision δ on a log grid, re-chosen without refitting."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext import aggregation
from bayesdiff_ext.evaluation.sources import CLOSED_FORM
from bayesdiff_ext.evaluation.replay import ReplayUNet
from bayesdiff_ext.sampler import BayesDiffSampler

__all__ = ["hyperparameter_sweep"]


def hyperparameter_sweep(config, unet, scheduler, posterior, calls, noise, rows) -> dict[str, np.ndarray]:
    """Closed-form Var[x_0] of a small batch for every (σ, δ) of the grid (replaying ``calls``).

    Returns ``sigmas``, ``priors``, ``scores`` (S, P, B) summed variances and ``maps`` (S, P, C, H, W)
    of the first image. ``posterior`` gets its fitted choice of σ and δ back afterwards.
    """
    sigmas, priors = config.sweep_sigmas, config.sweep_priors
    fitted = dict(sigma_noise=posterior.sigma_choice, prior_precision=posterior.prior_choice)
    scores = np.zeros((len(sigmas), len(priors), len(noise)))
    maps = np.zeros((len(sigmas), len(priors), *noise.shape[1:]))
    try:
        for i, sigma in enumerate(sigmas):
            for j, delta in enumerate(priors):
                posterior.set_hyperparameters(sigma_noise=sigma, prior_precision=delta)
                replay = ReplayUNet(unet, posterior.head, calls, rows)
                out = BayesDiffSampler(replay, scheduler, posterior).sample(
                    noise=noise, num_inference_steps=config.steps, progress=False, **CLOSED_FORM
                )
                scores[i, j] = aggregation.score_sum(out.variance).numpy()
                maps[i, j] = out.variance[0].numpy()
    finally:
        posterior.set_hyperparameters(**fitted)
    return {
        "sigmas": np.asarray(sigmas, np.float64),
        "priors": np.asarray(priors, np.float64),
        "scores": scores,
        "maps": maps,
        "fitted_sigma": np.float64(posterior.sigma_noise),
        "fitted_prior": np.float64(posterior.prior_precision),
    }

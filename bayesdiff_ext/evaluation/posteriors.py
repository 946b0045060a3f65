"""The posteriors the evaluation compares, all on the same head and one pass of fitting features.

The bundled posterior (diag GGN, σ by maximum likelihood, δ by MacKay) is loaded as shipped; the
others are fitted here from one pass of noised training images through the UNet (one t and ε per
image, seeded), so their differences come from the structure and hyperparameters alone.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.methods.selection import laplace_posterior_for
from bayesdiff_ext.posterior import LastLayerLaplace, capture_head_input

__all__ = ["FITTED", "build_posteriors", "fitting_features"]

#: name -> LastLayerLaplace constructor arguments for the posteriors fitted here.
FITTED = {
    "paper": dict(structure="diag", curvature="ef_bayesdiff"),  # σ = δ = 1, laplace-torch's 2×EF
    "full": dict(structure="full", curvature="ggn"),
    "isotropic": dict(structure="isotropic", curvature="ggn"),
}


@torch.no_grad()
def fitting_features(unet, scheduler, images, *, batch_size: int, seed: int, progress: bool):
    """(φ, ε) batches of the training images noised at one random timestep each."""
    posterior_head = LastLayerLaplace(unet, "diag").head
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for x0 in tqdm(images.split(batch_size), desc="fitting features", disable=not progress):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        with capture_head_input(posterior_head) as cap:
            unet(scheduler.add_noise(x0, noise, t), t)
        batches.append((cap.phi.clone(), noise))
    return batches


def build_posteriors(unet, default_path, features, *, hfl_probes: int) -> dict[str, LastLayerLaplace]:
    """{'default': the bundled posterior, every entry of :data:`FITTED` fitted on ``features``, and
    'hfl': Hessian-free Laplace with ``hfl_probes`` probes on the full posterior's curvature (so it
    estimates the full GGN's variance, by conjugate gradients and probes instead of a factorisation)}."""
    posteriors = {"default": LastLayerLaplace.load(default_path, unet)}
    for name, options in FITTED.items():
        posteriors[name] = LastLayerLaplace(unet, **options).fit_features(features)
    posteriors["hfl"] = laplace_posterior_for("hfl", posteriors["full"], probes=hfl_probes)
    return posteriors

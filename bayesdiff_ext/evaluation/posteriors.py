"""The posteriors the evaluation compares, all on the same head and one pass of fitting features.

Each is a :class:`PosteriorSpec` (a name and how to build it); a sampler run names the spec it
samples with, and :class:`Posteriors` builds each spec once, when a run first needs it. The default
posterior is the subject's file (the bundled one) or, for a model without one, a diag GGN fitted
here; the others are fitted from one pass of noised real images through the UNet (one t and ε per
image, seeded), so their differences come from the structure and hyperparameters alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.distributed import one_process
from bayesdiff_ext.methods.selection import laplace_posterior_for
from bayesdiff_ext.posterior import LastLayerLaplace, capture_head_input

__all__ = ["DEFAULT", "FULL", "HFL", "ISOTROPIC", "PAPER", "PosteriorSpec", "Posteriors", "describe", "fitting_features"]


@dataclass(frozen=True)
class PosteriorSpec:
    """A posterior by name: ``build(posteriors)`` makes it (``posteriors`` gives the fitting features
    and the other specs' posteriors)."""

    name: str
    build: Callable[[Posteriors], LastLayerLaplace]


def _fitted(name: str, **options) -> PosteriorSpec:
    return PosteriorSpec(name, lambda p: LastLayerLaplace(p.subject.unet, **options).fit_features(p.features()))


def _default(p: Posteriors) -> LastLayerLaplace:
    path = p.subject.posterior_path
    if path is None:
        return LastLayerLaplace(p.subject.unet, "diag").fit_features(p.features())
    return LastLayerLaplace.load(path, p.subject.unet)


DEFAULT = PosteriorSpec("default", _default)
PAPER = _fitted("paper", structure="diag", curvature="ef_bayesdiff")  # σ = δ = 1, laplace-torch's 2×EF
FULL = _fitted("full", structure="full", curvature="ggn")
ISOTROPIC = _fitted("isotropic", structure="isotropic", curvature="ggn")
#: Hessian-free Laplace on the full posterior's curvature: the full GGN's variance, by conjugate
#: gradients and Rademacher probes instead of a factorisation.
HFL = PosteriorSpec("hfl", lambda p: laplace_posterior_for("hfl", p.get(FULL), probes=p.config.hfl_probes))


@torch.no_grad()
def fitting_features(unet, scheduler, images, *, batch_size: int, seed: int, progress: bool):
    """(φ, ε) batches of the images noised at one random timestep each."""
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


class Posteriors:
    """Each spec's posterior, built once on first use; the fitting features likewise. ``fit_seconds``:
    each build's wall time, less the shared fitting pass it may have started."""

    def __init__(self, subject, config) -> None:
        self.subject, self.config = subject, config
        self._built: dict[str, LastLayerLaplace] = {}
        self._features = None
        self.features_seconds = 0.0
        self.fit_seconds: dict[str, float] = {}

    def features(self):
        if self._features is None:
            started = time.perf_counter()
            self._features = fitting_features(
                self.subject.unet,
                self.subject.scheduler,
                self.subject.real[: self.config.fit_images],
                batch_size=self.config.fit_batch_size,
                seed=self.config.seed,
                progress=self.config.progress,
            )
            self.features_seconds = time.perf_counter() - started
        return self._features

    def get(self, spec: PosteriorSpec) -> LastLayerLaplace:
        if spec.name not in self._built:
            features_before, started = self.features_seconds, time.perf_counter()
            self._built[spec.name] = self.fresh(spec)
            shared = self.features_seconds - features_before
            self.fit_seconds[spec.name] = time.perf_counter() - started - shared
        return self._built[spec.name]

    def fresh(self, spec: PosteriorSpec) -> LastLayerLaplace:
        """A new copy of ``spec``'s posterior (for a caller that changes its hyperparameters).

        Under ``torchrun`` every process fits it on all the data alone (no sum over the processes),
        so that each holds the one-process posterior bit for bit.
        """
        with one_process():
            return spec.build(self)

    def descriptions(self) -> dict[str, str]:
        return {
            name: f"{describe(posterior)}, built in {self.fit_seconds[name]:.3g} s"
            for name, posterior in self._built.items()
        }


def describe(posterior) -> str:
    # VI, HMC and head ensembles name their inference instead of a curvature
    kind = getattr(posterior, "inference", None) or posterior.curvature
    return f"{posterior.structure}/{kind}, σ = {posterior.sigma_noise:.4g}, δ = {posterior.prior_precision:.4g}"

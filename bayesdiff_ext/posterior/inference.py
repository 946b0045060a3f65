"""Posteriors of the head other than Laplace: variational inference, HMC, head ensembles.

All three fit on the same data pass as ``LastLayerLaplace`` (same (x_t, t, ε) draws for the same
generator) and then run on the head's linear-Gaussian statistics (``linear_gaussian``): the model
runs once, and the inference never touches it again. σ and δ are chosen exactly as the full-GGN
Laplace fit chooses them ('ml', 'mackay', 'marglik' or numbers), then held fixed; the exact
full-GGN Laplace on the same data stays available as ``.laplace`` after a fit, for comparisons.

They share the interface the sampler uses (``capture``, ``predict``, ``eps_channels``, ``head``),
``sample(n)`` of parameter vectors, and ``save``/``load`` (one file; ``load_posterior`` opens any).
Unlike Laplace, their mean is their own (VI's μ, the chain's mean, the members' mean), not the
head's weights; ``predict`` returns that mean and the variance around it.
"""

from __future__ import annotations

import abc
import time
from typing import ClassVar

import torch
from torch import nn

from bayesdiff_ext.posterior.capture import capture_head_input
from bayesdiff_ext.posterior.fitting import FitStatistics
from bayesdiff_ext.posterior.head_ensemble import initial_heads, train_members
from bayesdiff_ext.posterior.head_ops import check_phi
from bayesdiff_ext.posterior.hmc import run_hmc
from bayesdiff_ext.posterior.last_layer_laplace import LastLayerLaplace
from bayesdiff_ext.posterior.linear_gaussian import HeadStatistics, LinearGaussianHead, head_rows, rows_to_vector
from bayesdiff_ext.posterior.serialization import (
    matching_head,
    posterior_metadata,
    read_posterior_file,
    write_posterior_file,
)
from bayesdiff_ext.posterior.variational import fit_variational
from bayesdiff_ext.posterior.weight_distributions import DISTRIBUTIONS, WeightDistribution, WeightSamples

DISTRIBUTION_PREFIX = "distribution."


class _StatisticsLaplace(LastLayerLaplace):
    """The full-GGN Laplace whose data pass also keeps the linear-Gaussian statistics."""

    def __init__(self, *args, bootstrap: int = 0, bootstrap_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bootstrap, self.bootstrap_seed = bootstrap, bootstrap_seed
        self.statistics: HeadStatistics | None = None

    def _accumulator(self):
        generator = torch.Generator().manual_seed(self.bootstrap_seed)
        self.statistics = HeadStatistics(self.spec, bootstrap=self.bootstrap, generator=generator)
        return self.statistics


class LastLayerPosterior(abc.ABC):
    """Base of the non-Laplace head posteriors; subclasses say how ``_run`` turns the exact
    linear-Gaussian model into a ``WeightDistribution``.

    Args:
        model: as for ``LastLayerLaplace`` (a diffusers UNet, a bare Conv2d/Linear head, or any
            model with ``head=``); never modified. The head must be ungrouped.
        sigma_noise, prior_precision, temperature: as for ``LastLayerLaplace`` ('ml', 'mackay',
            'marglik' or positive numbers), chosen on the full-GGN spectrum and then fixed.
        seed: seeds the inference's own randomness (initial points, Monte Carlo draws, bootstrap
            weights); the data draws come from the ``generator`` given to ``fit``.
    """

    inference: ClassVar[str]
    curvature = None

    def __init__(
        self,
        model: nn.Module,
        *,
        head: nn.Module | None = None,
        eps_channels: int | None = None,
        sigma_noise: str | float | None = None,
        prior_precision: str | float | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        self.seed = int(seed)
        self.laplace = _StatisticsLaplace(
            model,
            "full",
            head=head,
            eps_channels=eps_channels,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            temperature=temperature,
            bootstrap=self._replicates(),
            bootstrap_seed=self.seed,
        )
        self.model, self.head, self.spec = model, self.laplace.head, self.laplace.spec
        self.sigma_choice, self.prior_choice = self.laplace.sigma_choice, self.laplace.prior_choice
        self.temperature = self.laplace.temperature
        self.sigma_noise: float | None = None
        self.prior_precision: float | None = None
        self.fit_stats = None
        self.distribution: WeightDistribution | None = None
        self.exact: LinearGaussianHead | None = None
        self.record: dict = {}

    # ------------------------------------------------------------------ what subclasses define
    def settings(self) -> dict:
        """The constructor's inference settings (saved; ``load`` passes them back)."""
        return {"seed": self.seed}

    def _replicates(self) -> int:
        """Bootstrap replicates the data pass accumulates."""
        return 0

    @abc.abstractmethod
    def _run(self, exact: LinearGaussianHead, generator: torch.Generator, progress: bool):
        """(WeightDistribution, record) of this inference on the exact model."""

    # ------------------------------------------------------------------ what the sampler uses
    @property
    def eps_channels(self) -> int:
        return self.spec.eps_channels

    @property
    def structure(self) -> str | None:
        """How the distribution is stored: 'diag', 'factored' or 'samples'."""
        return None if self.distribution is None else self.distribution.name

    def capture(self):
        """Context manager recording the head's input: ``with post.capture() as cap: ...; cap.phi``."""
        return capture_head_input(self.head)

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of ε at the head input φ through the fused ops; var ≥ 0, float32 or float64.

        Conv heads: φ (B, C_in, H, W) → (B, C_eps, H_out, W_out); Linear heads: (..., D) → (..., C_eps).
        """
        distribution = self._fitted()
        check_phi(self.spec, phi)
        return distribution.predict(phi)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, P) float64 ε-head parameter vectors (laplace-torch's ``parameters_to_vector`` order:
        the ε rows of the weight flattened row-major, then the ε biases)."""
        return self._fitted().sample(n_samples, generator)

    @property
    def precision_scale(self) -> float:
        """s = 1/(σ²·T) the distribution was fitted at."""
        if self.sigma_noise is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...) or load(...)")
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    # ------------------------------------------------------------------ fitting
    def fit(self, images, scheduler, *, progress: bool = True, **fit_options):
        """Fit on training images, exactly as ``LastLayerLaplace.fit`` (same arguments: ``batch_size``,
        ``timesteps_per_image``, ``generator``, ``model_kwargs``, ``sigma_noise``, ...), then infer."""
        self.laplace.fit(images, scheduler, progress=progress, **fit_options)
        return self._infer(progress)

    def fit_features(self, features, *, progress: bool = False, **fit_options):
        """Fit on precomputed (φ, target) batches, as ``LastLayerLaplace.fit_features``, then infer."""
        self.laplace.fit_features(features, progress=progress, **fit_options)
        return self._infer(progress)

    def exact_model(self, statistics_index: int | None = None) -> LinearGaussianHead:
        """The linear-Gaussian posterior of the fitted data (``statistics_index`` m: of bootstrap
        replicate m) at the fitted σ, δ."""
        lap, stats = self.laplace, self.laplace.statistics
        gram, cross = (
            (stats.gram, stats.cross)
            if statistics_index is None
            else (stats.boot_gram[statistics_index], stats.boot_cross[statistics_index])
        )
        return LinearGaussianHead(
            self.spec,
            gram,
            cross,
            head_rows(self.head, self.spec),
            s=lap.precision_scale,
            delta=lap.prior_precision,
            residual_sum_squares=lap.fit_stats.residual_sum_squares,
            residual_elements=lap.fit_stats.residual_elements,
            temperature=lap.temperature,
        )

    def _infer(self, progress: bool):
        lap = self.laplace
        self.sigma_noise, self.prior_precision = lap.sigma_noise, lap.prior_precision
        self.sigma_choice, self.prior_choice, self.temperature = lap.sigma_choice, lap.prior_choice, lap.temperature
        self.fit_stats = lap.fit_stats
        self.exact = self.exact_model()
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        self.distribution, record = self._run(self.exact, generator, progress)
        self.record = {**record, "inference_seconds": time.perf_counter() - started}
        return self

    def _fitted(self) -> WeightDistribution:
        if self.distribution is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...), fit_features(...) or load(...)")
        return self.distribution

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """One safetensors file in the Laplace format (``serialization``) with the distribution's
        tensors under ``distribution.`` and, in the metadata, ``inference``, ``settings`` (the
        constructor's options) and ``record`` (what the fit reported: ELBO, ESS, R̂, timings)."""
        meta = {
            **posterior_metadata(self),
            "inference": self.inference,
            "settings": self.settings(),
            "record": self.record,
        }
        write_posterior_file(path, meta, self._fitted().tensors(), prefix=DISTRIBUTION_PREFIX)

    @classmethod
    def load(cls, path, model: nn.Module, *, head: nn.Module | None = None):
        """Load a saved posterior of this kind onto ``model``; ValueError if the file holds another
        kind or its head differs, a warning if the head's weights differ from the fitted ones."""
        meta, tensors = read_posterior_file(path, prefix=DISTRIBUTION_PREFIX)
        inference = meta.get("inference", "laplace")
        if inference != cls.inference or meta.get("structure") not in DISTRIBUTIONS:
            raise ValueError(
                f"{path} holds a {inference!r} posterior ({meta.get('structure')!r}), not a {cls.inference!r} one; "
                "bayesdiff_ext.posterior.load_posterior opens any posterior file"
            )
        target_head, saved = matching_head(meta, path, model, head)
        post = cls(
            model,
            head=target_head,
            eps_channels=saved.eps_channels,
            sigma_noise=meta["sigma_noise_choice"],
            prior_precision=meta["prior_precision_choice"],
            temperature=meta["temperature"],
            **meta["settings"],
        )
        post.distribution = DISTRIBUTIONS[meta["structure"]].from_tensors(saved, tensors)
        post.fit_stats = None if meta["fit"] is None else FitStatistics(**meta["fit"])
        post.sigma_noise, post.prior_precision = meta["sigma_noise"], meta["prior_precision"]
        post.record = meta["record"]
        return post

    def __repr__(self) -> str:
        state = (
            f"{self.structure}, σ={self.sigma_noise:.4g}, δ={self.prior_precision:.4g}, T={self.temperature:g}"
            if self.distribution is not None
            else "not fitted"
        )
        return f"{type(self).__name__}(head={self.spec.shape_text()}, {state})"


class LastLayerVI(LastLayerPosterior):
    """Variational inference on the head (``variational``): ``family`` 'diag' (mean-field, served by
    the diagonal op) or 'full' (one K×K covariance shared by the channels, the factored op);
    ``steps`` Adam steps of ``samples`` reparameterised draws at learning rate ``lr``."""

    inference = "vi"

    def __init__(
        self, model, family: str = "diag", *, steps: int = 3000, samples: int = 16, lr: float = 0.05, **common
    ):
        self.options = dict(family=family, steps=steps, samples=samples, lr=lr)
        super().__init__(model, **common)

    def settings(self):
        return {**super().settings(), **self.options}

    def _run(self, exact, generator, progress):
        return fit_variational(exact, **self.options, generator=generator, progress=progress)


class LastLayerMCMC(LastLayerPosterior):
    """Hamiltonian Monte Carlo on the head (``hmc``): ``chains`` chains, ``warmup`` adaptation
    iterations, ``draws`` kept per chain every ``thin``-th iteration, at most ``leapfrog_steps`` per
    trajectory, step size by dual averaging to ``target_accept``. The posterior is the set of kept
    draws (interleaved: draw 0 of every chain, then draw 1, ...); ``record`` has ESS and R̂."""

    inference = "mcmc"

    def __init__(
        self,
        model,
        *,
        chains: int = 4,
        warmup: int = 1000,
        draws: int = 1000,
        thin: int = 1,
        leapfrog_steps: int = 16,
        target_accept: float = 0.8,
        **common,
    ):
        self.options = dict(chains=chains, warmup=warmup, draws=draws, thin=thin)
        self.options.update(leapfrog_steps=leapfrog_steps, target_accept=target_accept)
        super().__init__(model, **common)

    def settings(self):
        return {**super().settings(), **self.options}

    def _run(self, exact, generator, progress):
        draws, record = run_hmc(exact, **self.options, generator=generator, progress=progress)
        interleaved = draws.transpose(0, 1).flatten(0, 1)  # (draws·chains, C, K)
        return WeightSamples(self.spec, rows_to_vector(self.spec, interleaved)), record


class LastLayerHeadEnsemble(LastLayerPosterior):
    """A partial ensemble of ``members`` heads on the fixed trunk (``head_ensemble``), re-initialised
    as PyTorch initialises the layer and trained by gradient descent on the MAP objective:
    ``bootstrap=True`` (default) on Poisson-bootstrap replicates of the fitting data, ``steps``
    gradient steps (None = to convergence; a number = early stopping). With ``bootstrap=False`` and
    ``steps=None`` the members coincide (a convex objective has one optimum): no spread."""

    inference = "head-ensemble"

    def __init__(self, model, *, members: int = 8, bootstrap: bool = True, steps: int | None = None, **common):
        if isinstance(members, bool) or not isinstance(members, int) or members < 2:
            raise ValueError(f"members must be an integer >= 2, got {members!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be None or an integer >= 0, got {steps!r}")
        self.members, self.bootstrap, self.steps = members, bool(bootstrap), steps
        super().__init__(model, **common)

    def settings(self):
        return {**super().settings(), "members": self.members, "bootstrap": self.bootstrap, "steps": self.steps}

    def _replicates(self):
        return self.members if self.bootstrap else 0

    def _run(self, exact, generator, progress):
        channels, k = exact.theta_hat.shape
        start = initial_heads(self.members, channels, k, self.spec.taps, generator)
        targets = [self.exact_model(m) if self.bootstrap else exact for m in range(self.members)]
        heads = train_members(targets, start, self.steps)
        record = dict(members=self.members, bootstrap=self.bootstrap, steps=self.steps)
        return WeightSamples(self.spec, rows_to_vector(self.spec, heads)), record


INFERENCES: dict[str, type[LastLayerPosterior]] = {
    cls.inference: cls for cls in (LastLayerVI, LastLayerMCMC, LastLayerHeadEnsemble)
}

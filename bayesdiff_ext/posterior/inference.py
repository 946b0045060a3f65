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
import copy
import dataclasses
import time
import warnings
from typing import ClassVar

import torch
from torch import nn

from bayesdiff_ext.posterior.capture import capture_head_input
from bayesdiff_ext.posterior.fitting import FitStatistics
from bayesdiff_ext.posterior.full import require_ungrouped
from bayesdiff_ext.posterior.head_ensemble import initial_heads, train_members
from bayesdiff_ext.posterior.head_ops import check_phi
from bayesdiff_ext.posterior.heads import head_of_copy
from bayesdiff_ext.posterior.hmc import run_hmc
from bayesdiff_ext.posterior.last_layer_laplace import LastLayerLaplace
from bayesdiff_ext.posterior.linear_gaussian import HeadStatistics, LinearGaussianHead, head_rows, rows_to_vector
from bayesdiff_ext.posterior.serialization import (
    matching_head,
    posterior_metadata,
    read_posterior_file,
    write_posterior_file,
)
from bayesdiff_ext.posterior.settings import EnsembleSettings, HMCSettings, VISettings
from bayesdiff_ext.posterior.variational import fit_variational
from bayesdiff_ext.posterior.weight_distributions import DISTRIBUTIONS, WeightDistribution, WeightSamples

DISTRIBUTION_PREFIX = "distribution."
#: Convergence thresholds of Vehtari et al. (2021) below which LastLayerMCMC warns.
RHAT_LIMIT, ESS_PER_CHAIN = 1.01, 100


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
    r"""
    Base of the non-Laplace posteriors of a model's head (docs/MATH.md §10): one data pass, the exact
    linear-Gaussian model of the head, then the subclass's inference on it.

    Args:
        model (`torch.nn.Module`):
            As for `LastLayerLaplace`: a diffusers `UNet2DModel`/`UNet2DConditionModel`, a bare `nn.Conv2d`
            or `nn.Linear` head, or any model whose output layer is named by `head`. Never modified. The
            head must be ungrouped.
        head (`torch.nn.Module`, *optional*):
            The model's output layer, when it is not found by itself.
        eps_channels (`int`, *optional*):
            How many leading head outputs are ε (default as for `LastLayerLaplace`).
        sigma_noise (`str` or `float`, *optional*, defaults to `"ml"`):
            σ: `"ml"` or a positive number, chosen as the full-GGN Laplace fit chooses it, then fixed.
        prior_precision (`str` or `float`, *optional*, defaults to `"mackay"`):
            δ: `"mackay"`, `"marglik"` (on the full-GGN spectrum) or a positive number, then fixed.
        temperature (`float`, *optional*, defaults to 1.0):
            The likelihood's temperature T.
        seed (`int`, *optional*, defaults to 0):
            Seeds the inference's own randomness (initial points, Monte Carlo draws, bootstrap weights);
            the data draws come from the `generator` given to `fit`.
        **options:
            The subclass's settings (`VISettings`, `HMCSettings`, `EnsembleSettings`).

    Raises:
        `ValueError`: as for `LastLayerLaplace`, a grouped head, or an option out of range. `TypeError`: an
        option the inference does not have.
    """

    inference: ClassVar[str]
    settings_class: ClassVar[type]
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
        **options,
    ):
        self.options = self.settings_class(**options)
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
        require_ungrouped(self.spec, self.inference)
        self.sigma_choice, self.prior_choice = self.laplace.sigma_choice, self.laplace.prior_choice
        self.temperature = self.laplace.temperature
        self.sigma_noise: float | None = None
        self.prior_precision: float | None = None
        self.fit_stats: FitStatistics | None = None
        self.distribution: WeightDistribution | None = None
        self.exact: LinearGaussianHead | None = None
        self.record: dict = {}

    def settings(self) -> dict:
        """`dict`: the seed and the inference's settings, as saved (``load`` passes them back)."""
        return {"seed": self.seed, **dataclasses.asdict(self.options)}

    def _replicates(self) -> int:
        """Bootstrap replicates the data pass accumulates."""
        return 0

    @abc.abstractmethod
    def _run(self, exact: LinearGaussianHead, generator: torch.Generator, progress: bool):
        """(WeightDistribution, record) of this inference on the exact model."""

    # ------------------------------------------------------------------ what the sampler uses
    @property
    def eps_channels(self) -> int:
        """`int`: the number C_eps of leading head outputs that are ε."""
        return self.spec.eps_channels

    @property
    def structure(self) -> str | None:
        """`str`: how the distribution is stored and served: `"diag"`, `"factored"` or `"samples"`."""
        return None if self.distribution is None else self.distribution.name

    def capture(self):
        r"""
        Record the head's input during the forwards inside a `with` block.

        Returns:
            A context manager yielding a `HeadInputCapture` whose `phi` is the head input of the latest forward.
        """
        return capture_head_input(self.head)

    def for_model(self, model: nn.Module) -> LastLayerPosterior:
        r"""
        This posterior on `model`'s head: itself, or a copy on the head of a copy of its model, as
        `LastLayerLaplace.for_model`.
        """
        head = head_of_copy(model, self.model, self.head, self.spec)
        if head is self.head:
            return self
        self._fitted()
        moved = copy.copy(self)
        moved.model, moved.head = model, head
        return moved

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The mean and variance of ε at the head input φ under this posterior, through the fused ops
        (docs/MATH.md §10.4).

        Args:
            phi (`torch.Tensor`):
                The head's input: `(batch_size, in_channels, height, width)` for a conv head, `(..., in_features)`
                for a Linear head. float64 computes in float64; any other dtype in float32.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `(mean, var)`, each `(batch_size, eps_channels, height_out,
            width_out)` for a conv head or `(..., eps_channels)` for a Linear head, float64 for float64 `phi` and
            float32 otherwise. `mean` is this posterior's own mean (not the head's output); `var` ≥ 0.

        Raises:
            `RuntimeError`: the posterior is not fitted. `ValueError` / `TypeError`: `phi` does not fit the head.
        """
        distribution = self._fitted()
        check_phi(self.spec, phi)
        return distribution.predict(phi)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""
        Parameter vectors of the ε head drawn from this posterior.

        Args:
            n_samples (`int`):
                How many vectors.
            generator (`torch.Generator`, *optional*):
                A CPU generator for the draws (VI) or the order of the stored vectors (MCMC, ensembles).

        Returns:
            `torch.Tensor`: `(n_samples, num_params)` float64 in laplace-torch's `parameters_to_vector` order (the
            ε rows of the weight flattened row-major, then the ε biases). VI draws from q; MCMC and ensembles return
            stored vectors, distinct ones for `n_samples` ≤ their number and whole shuffled passes beyond it.
        """
        return self._fitted().sample(n_samples, generator)

    @property
    def precision_scale(self) -> float:
        """`float`: s = 1/(σ²·T) the distribution was fitted at."""
        if self.sigma_noise is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...) or load(...)")
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    # ------------------------------------------------------------------ fitting
    def fit(self, images, scheduler, *, progress: bool = True, **fit_options):
        r"""
        Run the Laplace fit's data pass on training images (one model forward per batch and draw), choose σ and
        δ, then run the inference on the head's statistics.

        Args:
            images, scheduler:
                As for `LastLayerLaplace.fit`.
            progress (`bool`, *optional*, defaults to `True`):
                Progress bars for the data pass and the inference.
            **fit_options:
                `batch_size`, `timesteps_per_image`, `generator`, `model_kwargs`, `sigma_noise`, `prior_precision`,
                `temperature`, as for `LastLayerLaplace.fit`.

        Returns:
            This posterior, fitted; `record` holds what the inference reported, `exact` the exact
            linear-Gaussian posterior and `laplace` the full-GGN Laplace of the same data.
        """
        self.laplace.fit(images, scheduler, progress=progress, **fit_options)
        return self._infer(progress)

    def fit_features(self, features, *, progress: bool = False, **fit_options):
        r"""
        As :meth:`fit`, on precomputed `(phi, target)` batches (see `LastLayerLaplace.fit_features`).

        Returns:
            This posterior, fitted.
        """
        self.laplace.fit_features(features, progress=progress, **fit_options)
        return self._infer(progress)

    def exact_model(self, replicate: int | None = None) -> LinearGaussianHead:
        r"""
        The exact linear-Gaussian posterior of the fitted data at the fitted σ, δ (docs/MATH.md §10.0).

        Args:
            replicate (`int`, *optional*):
                Of bootstrap replicate `replicate` instead (head ensembles).

        Returns:
            `LinearGaussianHead`
        """
        lap, stats = self.laplace, self.laplace.statistics
        if stats is None:
            raise RuntimeError("the exact model needs the fitting statistics: call fit(...) or fit_features(...)")
        if replicate is None:
            gram, cross = stats.gram, stats.cross
        else:
            gram, cross = stats.boot_gram[replicate], stats.boot_cross[replicate]
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
        r"""
        Save the fitted posterior as one safetensors file in the Laplace layout, written atomically: the
        distribution's tensors (float64, under `distribution.`) and, as JSON metadata, `inference`, `structure`,
        σ, δ, T and their choices, the head and its hash, the fitting statistics, `settings` and `record`.

        Args:
            path (`str` or `os.PathLike`):
                The file to write (its folder must exist); an existing file is replaced.
        """
        meta = {
            **posterior_metadata(self),
            "inference": self.inference,
            "settings": self.settings(),
            "record": self.record,
        }
        write_posterior_file(path, meta, self._fitted().tensors(), prefix=DISTRIBUTION_PREFIX)

    @classmethod
    def load(cls, path, model: nn.Module, *, head: nn.Module | None = None):
        r"""
        Load a posterior of this kind saved by :meth:`save` onto a model's head.

        Args:
            path (`str` or `os.PathLike`):
                The saved posterior.
            model (`torch.nn.Module`):
                The model (or bare head) it was fitted for.
            head (`torch.nn.Module`, *optional*):
                The model's output layer, as for the constructor.

        Returns:
            The posterior, with its settings, σ, δ and record (`exact` and `laplace` are not saved).

        Raises:
            `ValueError`: the file holds another kind of posterior (`load_posterior` opens any), or the head's
            shape differs. A `UserWarning` says when only the head's weights differ.
        """
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
    r"""
    Variational inference on the head by the reparameterised ELBO (docs/MATH.md §10.1).

    Args:
        model (`torch.nn.Module`):
            As for `LastLayerPosterior`, with its other keyword arguments (`head`, `eps_channels`, `sigma_noise`,
            `prior_precision`, `temperature`, `seed`).
        family (`str`, *optional*, defaults to `"diag"`):
            `"diag"` (mean-field: its optimum has the diagonal GGN-Laplace variances 1/(s·A_jj + δ), served by the
            diagonal op) or `"full"` (one K×K covariance shared by the channels: the exact posterior's family,
            served by the factored op).
        steps (`int`, *optional*, defaults to 3000):
            Adam steps.
        samples (`int`, *optional*, defaults to 16):
            Reparameterised draws per step.
        lr (`float`, *optional*, defaults to 0.05):
            Adam's learning rate, in units of the posterior's width.

    `record` after a fit: the exact `elbo`, `log_evidence`, `kl_to_posterior` and `elbo_trace`.
    """

    inference = "vi"
    settings_class = VISettings

    def _run(self, exact, generator, progress):
        return fit_variational(exact, self.options, generator=generator, progress=progress)


class LastLayerMCMC(LastLayerPosterior):
    r"""
    Hamiltonian Monte Carlo on the head (docs/MATH.md §10.2): several chains, Stan's windowed warm-up of a dense
    metric, dual-averaging step size, thinning; the posterior is the set of kept draws (stored draw-major, the
    chains interleaved).

    Args:
        model (`torch.nn.Module`):
            As for `LastLayerPosterior`, with its other keyword arguments.
        chains (`int`, *optional*, defaults to 4):
            Chains, run in lockstep.
        warmup (`int`, *optional*, defaults to 1000):
            Adaptation iterations per chain, discarded.
        draws (`int`, *optional*, defaults to 1000):
            Draws kept per chain.
        thin (`int`, *optional*, defaults to 1):
            Keep every `thin`-th iteration after warm-up.
        leapfrog_steps (`int`, *optional*, defaults to 16):
            The most leapfrog steps per trajectory (each iteration draws from ⌈n/2⌉..n).
        target_accept (`float`, *optional*, defaults to 0.8):
            The acceptance probability the step size is adapted to.

    `record` after a fit: `ess_min`, `ess_median`, `rhat_max`, `accept_rate`, `step_size`, `divergences`,
    `gradient_evaluations`; a `UserWarning` when R̂ > 1.01 or the ESS is under 100 per chain (Vehtari et al.
    2021's thresholds).
    """

    inference = "mcmc"
    settings_class = HMCSettings

    def _run(self, exact, generator, progress):
        draws, record = run_hmc(exact, self.options, generator=generator, progress=progress)
        if record["rhat_max"] > RHAT_LIMIT or record["ess_min"] < ESS_PER_CHAIN * self.options.chains:
            warnings.warn(
                f"the HMC chains have not converged (split-R̂ max {record['rhat_max']:.3g}, ESS min "
                f"{record['ess_min']:.0f}; aim for R̂ < {RHAT_LIMIT} and ESS > {ESS_PER_CHAIN} per chain): "
                "raise warmup (the metric needs it) or draws",
                stacklevel=4,
            )
        interleaved = draws.transpose(0, 1).flatten(0, 1)  # (draws·chains, C, K)
        return WeightSamples(self.spec, rows_to_vector(self.spec, interleaved)), record


class LastLayerHeadEnsemble(LastLayerPosterior):
    r"""
    A partial ensemble (docs/MATH.md §10.3): the trunk fixed, `members` heads re-initialised as PyTorch initialises
    the layer and trained by gradient descent on the MAP objective of the fitting data.

    The objective is convex with one optimum, so members trained to convergence on the same data all coincide: a
    plain head ensemble (`bootstrap=False`, `steps=None`) has no spread. The default trains each member on a Poisson
    bootstrap replicate of the data (spread ≈ the sampling distribution of the fit); `steps` stops early (spread
    left over from the random initialisation: a heuristic).

    Args:
        model (`torch.nn.Module`):
            As for `LastLayerPosterior`, with its other keyword arguments.
        members (`int`, *optional*, defaults to 8):
            Heads in the ensemble (at least 2).
        bootstrap (`bool`, *optional*, defaults to `True`):
            Train member m on bootstrap replicate m (accumulated in the same data pass).
        steps (`int`, *optional*):
            Gradient-descent steps of size 1/λ_max per member; `None` (default) trains to convergence.
    """

    inference = "head-ensemble"
    settings_class = EnsembleSettings

    def _replicates(self):
        return self.options.members if self.options.bootstrap else 0

    def _run(self, exact, generator, progress):
        members = self.options.members
        channels, k = exact.theta_hat.shape
        start = initial_heads(members, channels, k, self.spec.taps, generator)
        targets = [self.exact_model(m) if self.options.bootstrap else exact for m in range(members)]
        heads = train_members(targets, start, self.options.steps)
        return WeightSamples(self.spec, rows_to_vector(self.spec, heads)), {}


INFERENCES: dict[str, type[LastLayerPosterior]] = {
    cls.inference: cls for cls in (LastLayerVI, LastLayerMCMC, LastLayerHeadEnsemble)
}

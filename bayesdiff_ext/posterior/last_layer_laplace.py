"""LastLayerLaplace: a Laplace posterior on the noise-prediction head of a diffusion model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import nn

from bayesdiff_ext.posterior import hyperparameters as hp
from bayesdiff_ext.posterior.capture import capture_head_input
from bayesdiff_ext.posterior.diag import DiagCurvature
from bayesdiff_ext.posterior.fitting import FitStatistics, ModelKwargs, fit_on_features, fit_on_images
from bayesdiff_ext.posterior.full import FullPosterior, GramCurvature
from bayesdiff_ext.posterior.head_ops import check_phi
from bayesdiff_ext.posterior.heads import eps_parameters, resolve_head
from bayesdiff_ext.posterior.hfl import HessianFreePosterior
from bayesdiff_ext.posterior.isotropic import IsotropicPosterior
from bayesdiff_ext.posterior.kron import KronEFCurvature, KronPosterior
from bayesdiff_ext.posterior.registry import check_structure
from bayesdiff_ext.posterior.serialization import load_posterior, save_posterior
from bayesdiff_ext.posterior.structure import PosteriorStructure

# laplace-torch's EF is twice the squared per-sample gradients of ½‖r‖²; BayesDiff's code uses it
# with σ = δ = 1.
BAYESDIFF_EF_SCALE = 2.0
BAYESDIFF_DEFAULTS = {"sigma_noise": 1.0, "prior_precision": 1.0}
DEFAULTS = {"sigma_noise": "ml", "prior_precision": "mackay"}


class LastLayerLaplace:
    """A Laplace posterior N(θ_MAP, (s·H + δ·I)⁻¹) over the ε weights of a model's head.

    ``model`` is a diffusers ``UNet2DModel``/``UNet2DConditionModel`` (head: ``conv_out``), a bare
    ``nn.Conv2d``/``nn.Linear`` head, or any model with ``head=`` naming its output layer. The model
    is never modified: φ (the head's input) is read by a forward hook inside ``capture()``/``fit``.

    * ``structure``: ``'diag'``, ``'full'`` (exact GGN I_C ⊗ A_aug), ``'kron'`` (laplace-torch's
      KFAC), ``'isotropic'`` (Σ = λ⁻¹·I, λ = s·mean(h) + δ: the reproduction's "Hessian-free"
      baseline) or ``'hfl'`` (McInerney & Kallus's Hessian-free Laplace: the full-GGN variance
      estimated from regularised optima with random probes, :mod:`~bayesdiff_ext.posterior.hfl`).
    * ``curvature``: ``'ggn'`` (default), ``'ef'`` (empirical Fisher, per image), or for diag
      ``'ef_bayesdiff'`` (laplace-torch's 2×EF with σ = δ = 1 unless given: BayesDiff's code).
    * ``sigma_noise``: ``'ml'`` (√ mean residual², default) or a float; ``prior_precision``:
      ``'mackay'`` (default), ``'marglik'`` or a float; ``temperature`` T; s = 1/(σ²·T).
    * ``eps_channels``: the leading head outputs that are ε (default: half of them for a UNet whose
      out_channels = 2·in_channels, i.e. a learned-variance head; otherwise all).
    """

    def __init__(
        self,
        model: nn.Module,
        structure: str = "diag",
        curvature: str = "ggn",
        *,
        head: nn.Module | None = None,
        eps_channels: int | None = None,
        sigma_noise: str | float | None = None,
        prior_precision: str | float | None = None,
        temperature: float = 1.0,
    ):
        check_structure(structure, curvature)
        self.model = model
        self.head, self.spec = resolve_head(model, head, eps_channels)
        self.structure = structure
        self.curvature = curvature
        defaults = BAYESDIFF_DEFAULTS if curvature == "ef_bayesdiff" else DEFAULTS
        self.sigma_choice = _check_choice(
            "sigma_noise", defaults["sigma_noise"] if sigma_noise is None else sigma_noise, hp.SIGMA_CHOICES
        )
        self.prior_choice = _check_choice(
            "prior_precision",
            defaults["prior_precision"] if prior_precision is None else prior_precision,
            hp.PRIOR_CHOICES,
        )
        self.temperature = _positive("temperature", temperature)
        self.sigma_noise: float | None = None
        self.prior_precision: float | None = None
        self.fit_stats: FitStatistics | None = None
        self.posterior: PosteriorStructure | None = None

    # ------------------------------------------------------------------ what the sampler uses
    @property
    def eps_channels(self) -> int:
        return self.spec.eps_channels

    def capture(self):
        """Context manager recording the head's input: ``with post.capture() as cap: ...; cap.phi``."""
        return capture_head_input(self.head)

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) of ε at the head input φ through the fused ops; var ≥ 0, float32 or float64.

        Conv heads: φ (B, C_in, H, W) → (B, C_eps, H_out, W_out); Linear heads: (..., D) → (..., C_eps).
        """
        posterior = self._fitted()
        check_phi(self.spec, phi)
        weight, bias = eps_parameters(self.head, self.spec)
        return posterior.predict(phi, weight, bias, self.precision_scale, self.prior_precision)

    @property
    def precision_scale(self) -> float:
        """s = 1/(σ²·T), the weight of the curvature in the posterior precision."""
        if self.sigma_noise is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...) or load(...)")
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        images,
        scheduler,
        *,
        batch_size: int = 16,
        timesteps_per_image: int = 1,
        generator: torch.Generator | None = None,
        model_kwargs: ModelKwargs = None,
        progress: bool = True,
        sigma_noise: str | float | None = None,
        prior_precision: str | float | None = None,
        temperature: float | None = None,
    ) -> LastLayerLaplace:
        """Fit on training images x_0 (model scale; a tensor (N,C,H,W), a Dataset or a DataLoader).

        Each image gets ``timesteps_per_image`` draws t ~ U{0..T−1} and ε ~ N(0, I) noised by
        ``scheduler.add_noise`` (per batch and draw: t, then ε, both from ``generator`` on its
        device, so a seed reproduces the fit). ``model_kwargs`` (a dict, or a callable of the x_0
        batch returning one) is passed to the model. The model runs in eval mode without gradients
        and gets its mode back afterwards. σ and δ are then chosen as configured (the keyword
        arguments here override the constructor's).
        """
        accumulator = self._accumulator()
        with _eval_no_grad(self.model):
            stats = fit_on_images(
                self.model,
                self.head,
                self.spec,
                accumulator,
                images,
                scheduler,
                batch_size=batch_size,
                timesteps_per_image=timesteps_per_image,
                generator=generator,
                model_kwargs=model_kwargs,
                progress=progress,
            )
        return self._finish_fit(accumulator, stats, sigma_noise, prior_precision, temperature)

    def fit_features(
        self,
        features: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        progress: bool = False,
        sigma_noise: str | float | None = None,
        prior_precision: str | float | None = None,
        temperature: float | None = None,
    ) -> LastLayerLaplace:
        """Fit on precomputed batches (φ, target), target = ε in the head's output layout (for
        models whose output is not the head's output, e.g. a Linear head before unpatchify)."""
        accumulator = self._accumulator()
        with _eval_no_grad(self.head):
            stats = fit_on_features(self.head, self.spec, accumulator, features, progress=progress)
        return self._finish_fit(accumulator, stats, sigma_noise, prior_precision, temperature)

    def _accumulator(self):
        if self.structure == "full":
            return GramCurvature(self.spec, "full", FullPosterior.from_augmented_gram)
        if self.structure == "hfl":
            return GramCurvature(self.spec, "hfl", HessianFreePosterior.from_augmented_gram)
        if self.structure == "kron" and self.curvature == "ggn":
            return GramCurvature(self.spec, "kron", KronPosterior.from_augmented_gram)
        if self.structure == "kron":
            return KronEFCurvature(self.spec, *eps_parameters(self.head, self.spec))
        kind = "ef" if self.curvature == "ef_bayesdiff" else self.curvature
        scale = BAYESDIFF_EF_SCALE if self.curvature == "ef_bayesdiff" else 1.0
        return DiagCurvature(self.spec, kind, scale)

    def _finish_fit(self, accumulator, stats, sigma_noise, prior_precision, temperature) -> LastLayerLaplace:
        posterior = accumulator.finish()
        if self.structure == "isotropic":
            posterior = IsotropicPosterior.from_diag(posterior)
        self.posterior, self.fit_stats = posterior, stats
        return self.set_hyperparameters(
            sigma_noise=sigma_noise, prior_precision=prior_precision, temperature=temperature
        )

    def set_hyperparameters(
        self,
        *,
        sigma_noise: str | float | None = None,
        prior_precision: str | float | None = None,
        temperature: float | None = None,
    ) -> LastLayerLaplace:
        """Re-choose σ, δ and T from the stored curvature (no refit): e.g. a sweep over δ.

        None keeps the current choice; 'ml', 'mackay' and 'marglik' are re-evaluated.
        """
        self._fitted()
        if sigma_noise is not None:
            self.sigma_choice = _check_choice("sigma_noise", sigma_noise, hp.SIGMA_CHOICES)
        if prior_precision is not None:
            self.prior_choice = _check_choice("prior_precision", prior_precision, hp.PRIOR_CHOICES)
        if temperature is not None:
            self.temperature = _positive("temperature", temperature)
        if self.sigma_choice == "ml":
            stats = self.fit_stats or FitStatistics()
            self.sigma_noise = hp.sigma_ml(stats.residual_sum_squares, stats.residual_elements)
        else:
            self.sigma_noise = self.sigma_choice
        self.prior_precision = self._choose_prior_precision()
        return self

    def _choose_prior_precision(self) -> float:
        if not isinstance(self.prior_choice, str):
            return self.prior_choice
        values, counts = self.posterior.spectrum()
        theta = self.theta_norm2()
        if self.prior_choice == "mackay":
            return hp.mackay_prior_precision(values, counts, theta, self.precision_scale)
        return hp.marglik_prior_precision(values, counts, theta, self.precision_scale)

    def theta_norm2(self) -> float:
        """‖θ_MAP‖² of the ε weights and biases (the prior mean is 0)."""
        weight, bias = eps_parameters(self.head, self.spec)
        total = weight.to(torch.float64).square().sum()
        if bias is not None:
            total = total + bias.to(torch.float64).square().sum()
        return float(total)

    def log_marginal_likelihood(self, prior_precision: float | None = None, sigma_noise: float | None = None) -> float:
        """The Laplace evidence (laplace-torch's ``log_marginal_likelihood``) at the current or given σ, δ."""
        posterior = self._fitted()
        if self.fit_stats is None:
            raise RuntimeError("the evidence needs the fitting residuals; this posterior was not fitted here")
        values, counts = posterior.spectrum()
        return hp.log_marginal_likelihood(
            values,
            counts,
            self.theta_norm2(),
            residual_sum_squares=self.fit_stats.residual_sum_squares,
            residual_elements=self.fit_stats.residual_elements,
            sigma=self.sigma_noise if sigma_noise is None else sigma_noise,
            delta=self.prior_precision if prior_precision is None else prior_precision,
            temperature=self.temperature,
        )

    def _fitted(self) -> PosteriorStructure:
        if self.posterior is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...), fit_features(...) or load(...)")
        return self.posterior

    # ------------------------------------------------------------------ persistence, adoption
    def save(self, path) -> None:
        """One safetensors file: the curvature tensors, all settings as JSON in its header metadata."""
        self._fitted()
        save_posterior(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, *, head: nn.Module | None = None) -> LastLayerLaplace:
        """Load a saved posterior onto ``model``; ValueError if its head differs from the saved one."""
        saved = load_posterior(path, model, head)
        post = cls(
            model,
            saved.structure,
            saved.curvature,
            head=saved.head,
            eps_channels=saved.spec.eps_channels,
            sigma_noise=saved.sigma_choice,
            prior_precision=saved.prior_choice,
            temperature=saved.temperature,
        )
        return post._restore(saved.posterior, saved.fit_stats, saved.sigma_noise, saved.prior_precision)

    @classmethod
    def from_laplace_torch(cls, la, head: nn.Module, *, eps_channels: int | None = None) -> LastLayerLaplace:
        """Adopt a laplace-torch DiagLaplace/KronLaplace/FullLaplace fitted on Sequential(head, Flatten)."""
        from bayesdiff_ext.posterior.laplace_torch import adopt

        adopted = adopt(la, head, eps_channels)
        post = cls(
            head,
            adopted.structure,
            adopted.curvature,
            eps_channels=adopted.spec.eps_channels,
            sigma_noise=adopted.sigma_noise,
            prior_precision=adopted.prior_precision,
            temperature=adopted.temperature,
        )
        return post._restore(adopted.posterior, adopted.fit_stats, adopted.sigma_noise, adopted.prior_precision)

    def with_structure(self, posterior: PosteriorStructure) -> LastLayerLaplace:
        """A copy that predicts with another structure built from this one's curvature (e.g. 'hfl' from
        a 'full' Gram matrix, 'isotropic' from a 'diag' one); σ, δ and T are re-chosen as configured.

        This posterior is left unchanged; the copy shares its model, head and fitting statistics.
        """
        derived = copy.copy(self)
        derived.structure, derived.posterior = posterior.name, posterior
        return derived.set_hyperparameters()

    def _restore(self, posterior: PosteriorStructure, fit_stats, sigma_noise: float, prior_precision: float):
        """Take a fitted structure with the σ and δ it was used with (loading, adoption): no re-choice."""
        self.posterior, self.fit_stats = posterior, fit_stats
        self.sigma_noise, self.prior_precision = float(sigma_noise), float(prior_precision)
        return self

    def __repr__(self) -> str:
        state = (
            f"σ={self.sigma_noise:.4g}, δ={self.prior_precision:.4g}, T={self.temperature:g}"
            if self.posterior is not None
            else "not fitted"
        )
        return f"LastLayerLaplace({self.structure}/{self.curvature}, head={self.spec.shape_text()}, {state})"


@contextlib.contextmanager
def _eval_no_grad(module: nn.Module):
    """Eval mode and no gradients for the duration, restoring every submodule's mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_choice(name: str, value, choices: tuple[str, ...]):
    if isinstance(value, str):
        if value not in choices:
            raise ValueError(f"{name} must be a positive float or one of {choices}, got {value!r}")
        return value
    return _positive(name, value)


def _positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive float, got {value!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value

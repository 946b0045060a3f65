"""LastLayerLaplace: a Laplace posterior on the noise-prediction head of a diffusion model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import nn

from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior import hyperparameters as hp
from bayesdiff_ext.posterior.capture import capture_head_input, capture_token_grid
from bayesdiff_ext.posterior.diag import DiagCurvature
from bayesdiff_ext.posterior.fitting import FitStatistics, ModelKwargs, fit_on_features, fit_on_images
from bayesdiff_ext.posterior.full import FullPosterior, GramCurvature
from bayesdiff_ext.posterior.head_ops import check_phi
from bayesdiff_ext.posterior.heads import eps_parameters, head_of_copy
from bayesdiff_ext.posterior.hfl import HessianFreePosterior
from bayesdiff_ext.posterior.isotropic import IsotropicPosterior
from bayesdiff_ext.posterior.kron import KronEFCurvature, KronPosterior
from bayesdiff_ext.posterior.output_layout import describe_head
from bayesdiff_ext.posterior.registry import check_structure
from bayesdiff_ext.posterior.serialization import load_posterior, save_posterior
from bayesdiff_ext.posterior.structure import PosteriorStructure

# laplace-torch's EF is twice the squared per-sample gradients of ½‖r‖²; BayesDiff's code uses it
# with σ = δ = 1.
BAYESDIFF_EF_SCALE = 2.0
BAYESDIFF_DEFAULTS = {"sigma_noise": 1.0, "prior_precision": 1.0}
DEFAULTS = {"sigma_noise": "ml", "prior_precision": "mackay"}


class LastLayerLaplace:
    r"""
    A Laplace posterior N(θ_MAP, (s·H + δ·I)⁻¹) over the ε weights of a model's head, s = 1/(σ²·T)
    (docs/MATH.md §1).

    The model is never modified: φ (the head's input) is read by a forward hook inside
    :meth:`capture` and :meth:`fit`. Build it, then :meth:`fit` (or :meth:`fit_features`, or
    :meth:`load` a saved one, or adopt a laplace-torch posterior with :meth:`from_laplace_torch`);
    :meth:`predict` then gives the closed-form mean and variance of ε at any φ.

    Args:
        model (`torch.nn.Module`):
            A diffusers `UNet2DModel` or `UNet2DConditionModel` (head: `conv_out`), `DiTTransformer2DModel`
            (`proj_out_2`), `PixArtTransformer2DModel`, `SD3Transformer2DModel` or `FluxTransformer2DModel`
            (the top-level `proj_out`), a bare `nn.Conv2d` or `nn.Linear` head, or any model whose output layer
            (a token-wise `nn.Linear` included) is named by `head`. DiT, PixArt and SD3 unpatchify their head's
            output: :meth:`capture` gives φ on the token grid and :meth:`predict` returns the model's layout
            (docs/MATH.md §8).
        structure (`str`, *optional*, defaults to `"diag"`):
            `"diag"`, `"full"` (the exact GGN, I_C ⊗ A_aug), `"kron"` (laplace-torch's KFAC), `"isotropic"`
            (Σ = λ⁻¹·I, λ = s·mean(h) + δ: the reproduction's "Hessian-free" baseline) or `"hfl"` (McInerney &
            Kallus's Hessian-free Laplace on the full GGN's curvature, docs/MATH.md §7).
        curvature (`str`, *optional*, defaults to `"ggn"`):
            `"ggn"`, `"ef"` (empirical Fisher, per image; diag, kron, isotropic) or `"ef_bayesdiff"` (diag only:
            laplace-torch's 2×EF with σ = δ = 1 unless given, as BayesDiff's code).
        head (`torch.nn.Module`, *optional*):
            The `nn.Conv2d` or `nn.Linear` output layer of `model`, when it is not found by itself.
        eps_channels (`int`, *optional*):
            How many leading output channels of the model are ε. Defaults to half of them for a UNet or
            transformer whose `out_channels` is twice its `in_channels` (a learned-variance head), otherwise
            all; for a patch transformer the head's ε rows follow (p² per channel).
        sigma_noise (`str` or `float`, *optional*, defaults to `"ml"`):
            The observation noise σ: `"ml"` (√ of the mean squared fitting residual) or a positive number.
        prior_precision (`str` or `float`, *optional*, defaults to `"mackay"`):
            The prior precision δ: `"mackay"` (MacKay's fixed point), `"marglik"` (the maximum of the Laplace
            evidence) or a positive number.
        temperature (`float`, *optional*, defaults to 1.0):
            The temperature T of the likelihood.

    Raises:
        `ValueError`: an unknown structure or curvature, a curvature the structure cannot use, a head that is
        not the model's output (see docs/MATH.md §1), or a non-positive σ, δ or T.
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
        self.head, self.spec, self.layout = describe_head(model, head, eps_channels)
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
        """`int`: the number C_eps of leading output channels of the model that are ε (the posterior covers
        the weights of the head outputs they come from)."""
        return self.spec.eps_channels if self.layout is None else self.layout.eps_channels

    def capture(self):
        r"""
        Record the head's input during the forwards inside a `with` block.

        Returns:
            A context manager yielding a `HeadInputCapture` whose `phi` is the head input of the latest
            forward: `with posterior.capture() as cap: unet(x, t); posterior.predict(cap.phi)`. For DiT, PixArt
            and SD3, `phi` is the tokens on their grid, `(batch_size, height / p, width / p, in_features)`.
        """
        if self.layout is not None:
            return capture_token_grid(self.model, self.head, self.layout)
        return capture_head_input(self.head)

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The closed-form mean and variance of ε given the head input φ (docs/MATH.md §1.1), through the fused
        ops.

        Args:
            phi (`torch.Tensor`):
                The head's input: `(batch_size, in_channels, height, width)` for a conv head, `(..., in_features)`
                for a Linear head, the token grid `(batch_size, h, w, in_features)` for a patch transformer (as
                :meth:`capture` records it). float64 computes in float64; any other dtype in float32.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `(mean, var)`, each of shape `(batch_size, eps_channels,
            height_out, width_out)` for a conv head, `(..., eps_channels)` for a Linear head, or the model's
            unpatchified `(batch_size, eps_channels, h·p, w·p)` for a patch transformer, float64 for float64
            `phi` and float32 otherwise. `mean` is the head's own output on its ε channels; `var` ≥ 0.

        Raises:
            `RuntimeError`: the posterior is not fitted. `ValueError` / `TypeError`: `phi` does not fit the head.
        """
        posterior = self._fitted()
        check_phi(self.spec, phi)
        if self.layout is not None and phi.dim() != 4:
            raise ValueError(
                f"`phi` of a patch transformer's head must be its tokens on their grid (B, h, w, "
                f"{self.spec.in_channels}), as capture() records them; got {tuple(phi.shape)}"
            )
        weight, bias = eps_parameters(self.head, self.spec)
        mean, var = posterior.predict(phi, weight, bias, self.precision_scale, self.prior_precision)
        if self.layout is not None:
            return self.layout.to_output(mean), self.layout.to_output(var)
        return mean, var

    @property
    def precision_scale(self) -> float:
        """`float`: s = 1/(σ²·T), the weight of the curvature in the posterior precision s·H + δ·I."""
        if self.sigma_noise is None:
            raise RuntimeError("the posterior is not fitted yet: call fit(...) or load(...)")
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    # ------------------------------------------------------------------ following the model
    def for_model(self, model: nn.Module) -> LastLayerLaplace:
        r"""
        This posterior on `model`'s head: itself when its head is a module of `model`, otherwise a copy on the
        module of `model` at the head's path (e.g. `conv_out`), for a `copy.deepcopy` of the model or a copy
        moved to another device or dtype. The samplers call it, so a posterior follows its model's copies.

        Args:
            model (`torch.nn.Module`):
                The model to predict for.

        Returns:
            `LastLayerLaplace`: `self`, or a copy sharing the fitted state, its curvature on the head's device.

        Raises:
            `ValueError`: `model` has no module of the head's kind at its path, of its shape, with its weights (up
            to the cast to the copy's dtype); the message says what to do. `RuntimeError`: a copy is needed but
            the posterior is not fitted.
        """
        head = head_of_copy(model, self.model, self.head, self.spec)
        if head is self.head:
            return self
        moved = copy.copy(self)
        moved.model, moved.head = model, head
        moved.posterior = self._fitted().to(head.weight.device)
        return moved

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LastLayerLaplace:
        r"""
        Move the curvature to `device` and prepare the prediction for a head input φ of `dtype` there (in place,
        like `nn.Module.to`). The curvature stays float64 and the variances are computed in float32 for 16- and
        32-bit φ, float64 for float64 φ (`numerics.accumulation_dtype`); the model is not moved.

        Args:
            device (`torch.device` or `str`, *optional*):
                Where the model runs; defaults to the head's device.
            dtype (`torch.dtype`, *optional*):
                The model's floating-point dtype; defaults to the head's.

        Returns:
            `LastLayerLaplace`: this posterior.

        Raises:
            `RuntimeError`: the posterior is not fitted. `TypeError`: `dtype` is not a floating-point dtype.
        """
        device = torch.device(device) if device is not None else self.head.weight.device
        dtype = dtype if dtype is not None else self.head.weight.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        posterior = self._fitted().to(device)
        posterior.prepared_inputs(self.precision_scale, self.prior_precision, device, accumulation_dtype(dtype))
        self.posterior = posterior
        return self

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
        r"""
        Fit the curvature on noised training images (docs/MATH.md §1.2), then choose σ and δ.

        Each image gets `timesteps_per_image` draws of the noise the model was trained with (docs/MATH.md §9):
        t ~ U{0, …, T_train−1} and x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for a DDPM-family scheduler, with the
        target ε, v or x_0 by its `prediction_type`; σ and x_t = (1−σ)·x_0 + σ·ε with the target ε − x_0 for
        flow matching. The head sees the model's features of x_t (the model is called through
        :class:`~bayesdiff_ext.denoiser.Denoiser`) and the residual of its prediction, moved back onto the
        token grid for a patch transformer. The model runs in eval mode without gradients and gets its
        mode back afterwards.

        Args:
            images (`torch.Tensor`, `torch.utils.data.Dataset` or `torch.utils.data.DataLoader`):
                Training images x_0 at model scale (usually [-1, 1]) in the model's sample layout: a tensor of
                shape `(num_images, channels, height, width)` (Flux: packed tokens `(num_images, tokens,
                channels)`), or a dataset/loader whose items are such images (or tuples, or dicts with an
                `"images"`, `"image"` or `"pixel_values"` entry).
            scheduler (`SchedulerMixin` or `TrainingNoise`):
                A DDPM-family diffusers scheduler (its ᾱ table and `prediction_type`), a
                `FlowMatchEulerDiscreteScheduler` (flow matching with σ uniform), or a
                :class:`~bayesdiff_ext.posterior.training_noise.TrainingNoise` such as
                `FlowMatchingNoise(scheduler, "logit_normal", mu=...)`.
            batch_size (`int`, *optional*, defaults to 16):
                Images per model forward (for a tensor or a dataset).
            timesteps_per_image (`int`, *optional*, defaults to 1):
                (t, ε) draws per image.
            generator (`torch.Generator`, *optional*):
                The source of the timesteps and ε (per batch and draw: the timestep, then ε, on the generator's
                device); a seeded one reproduces the fit.
            model_kwargs (`dict` or callable, *optional*):
                Keyword arguments of every model call, or a function of the x_0 batch returning them (e.g.
                `encoder_hidden_states` of a conditional UNet).
            progress (`bool`, *optional*, defaults to `True`):
                Show a progress bar.
            sigma_noise (`str` or `float`, *optional*):
                Overrides the constructor's choice of σ (`"ml"` or a positive number).
            prior_precision (`str` or `float`, *optional*):
                Overrides the constructor's choice of δ (`"mackay"`, `"marglik"` or a positive number).
            temperature (`float`, *optional*):
                Overrides the constructor's temperature T.

        Returns:
            `LastLayerLaplace`: this posterior, fitted.
        """
        accumulator = self._accumulator()
        with _eval_no_grad(self.model):
            stats = fit_on_images(
                self.model,
                self.head,
                self.spec,
                self.layout,
                self.capture,
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
        r"""
        Fit the curvature on precomputed head inputs and targets, for models whose output is not the head's
        output (e.g. a Linear head before unpatchify), then choose σ and δ.

        Args:
            features (iterable of `(torch.Tensor, torch.Tensor)`):
                Batches `(phi, target)`: `phi` the head's input (`(batch_size, in_channels, height, width)` or
                `(..., in_features)`), `target` the true ε in the layout of the head's ε outputs.
            progress (`bool`, *optional*, defaults to `False`):
                Show a progress bar.
            sigma_noise, prior_precision, temperature (*optional*):
                Override the constructor's choices, as in :meth:`fit`.

        Returns:
            `LastLayerLaplace`: this posterior, fitted.
        """
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
        r"""
        Re-choose σ, δ and T from the stored curvature, without refitting (e.g. a sweep over δ).

        Args:
            sigma_noise (`str` or `float`, *optional*):
                `"ml"` or a positive number; `None` keeps the current choice.
            prior_precision (`str` or `float`, *optional*):
                `"mackay"`, `"marglik"` or a positive number; `None` keeps the current choice.
            temperature (`float`, *optional*):
                A positive number; `None` keeps the current temperature.

        Returns:
            `LastLayerLaplace`: this posterior. `"ml"`, `"mackay"` and `"marglik"` are evaluated anew (on the
            fitting residuals and the curvature's spectrum, docs/MATH.md §1.2).
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
        r"""
        Returns:
            `float`: ‖θ_MAP‖², the squared norm of the head's ε weights and biases (the prior mean is 0), in
            float64.
        """
        weight, bias = eps_parameters(self.head, self.spec)
        total = weight.to(torch.float64).square().sum()
        if bias is not None:
            total = total + bias.to(torch.float64).square().sum()
        return float(total)

    def log_marginal_likelihood(self, prior_precision: float | None = None, sigma_noise: float | None = None) -> float:
        r"""
        The Laplace evidence log Z(σ, δ) (docs/MATH.md §1.2; laplace-torch's `log_marginal_likelihood`).

        Args:
            prior_precision (`float`, *optional*):
                δ to evaluate at; defaults to the current one.
            sigma_noise (`float`, *optional*):
                σ to evaluate at; defaults to the current one.

        Returns:
            `float`: the log evidence at the current temperature.

        Raises:
            `RuntimeError`: the posterior is not fitted, or was adopted without fitting residuals.
        """
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
        r"""
        Save the fitted posterior as one safetensors file, written atomically: the curvature tensors in float64,
        and σ, δ, T, their choices, the head, the fitting statistics, a hash of the head's weights and the library
        versions as JSON in its header metadata.

        Args:
            path (`str` or `os.PathLike`):
                The file to write (its folder must exist); an existing file is replaced.
        """
        self._fitted()
        save_posterior(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, *, head: nn.Module | None = None) -> LastLayerLaplace:
        r"""
        Load a posterior saved by :meth:`save` onto a model's head.

        Args:
            path (`str` or `os.PathLike`):
                The saved posterior.
            model (`torch.nn.Module`):
                The model (or bare head) it was fitted for.
            head (`torch.nn.Module`, *optional*):
                The model's output layer, as for the constructor.

        Returns:
            `LastLayerLaplace`: the posterior, with the σ and δ it was saved with.

        Raises:
            `ValueError`: the file is not a saved posterior, or the head's shape differs from the saved one.
            A `UserWarning` says when only the head's weights differ.
        """
        saved = load_posterior(path, model, head)
        post = cls(
            model,
            saved.structure,
            saved.curvature,
            head=saved.head,
            eps_channels=saved.eps_channels,
            sigma_noise=saved.sigma_choice,
            prior_precision=saved.prior_choice,
            temperature=saved.temperature,
        )
        return post._restore(saved.posterior, saved.fit_stats, saved.sigma_noise, saved.prior_precision)

    @classmethod
    def from_laplace_torch(cls, la, head: nn.Module, *, eps_channels: int | None = None) -> LastLayerLaplace:
        r"""
        Adopt a fitted laplace-torch posterior (docs/MATH.md §1.3): its curvature, σ, δ and T carry over.

        Args:
            la (`laplace.DiagLaplace`, `laplace.KronLaplace` or `laplace.FullLaplace`):
                Fitted on `nn.Sequential(head, nn.Flatten())` (a conv head) or on the Linear head, with a zero
                prior mean and a scalar prior precision; a `FullLaplace` must hold a GGN (I_C ⊗ A_aug).
            head (`torch.nn.Conv2d` or `torch.nn.Linear`):
                The head `la` was fitted on.
            eps_channels (`int`, *optional*):
                How many leading head outputs are ε (default: all).

        Returns:
            `LastLayerLaplace`: a posterior on `head` that predicts what `la` predicts.
        """
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
        r"""
        A copy that predicts with another structure built from this one's curvature.

        Args:
            posterior (`PosteriorStructure`):
                The structure, e.g. `HessianFreePosterior(spec, full.posterior.gram)` from a `"full"` posterior or
                `IsotropicPosterior.from_diag(diag.posterior)` from a `"diag"` one.

        Returns:
            `LastLayerLaplace`: the copy, its σ, δ and T re-chosen as configured. It shares this posterior's
            model, head and fitting statistics; this posterior is left unchanged.
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

"""BayesDiffPipeline: an existing diffusers pipeline, called as usual, with BayesDiff uncertainty.

Each wrapper declares the stock pipeline it wraps (``class X(BayesDiffPipeline, wraps=StockPipeline)``)
and implements ``_generate``. Its ``__call__`` is built here once from the stock ``__call__``: the
stock signature and Args, then the uncertainty arguments (keyword-only), so ``help()`` and
``inspect.signature`` show the real arguments and unknown ones are a TypeError, as for the stock call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext import latent
from bayesdiff_ext.guidance import ClassifierFreeGuidance, check_guidance_variance, same_value
from bayesdiff_ext.pipelines.method import PipelineMethod
from bayesdiff_ext.posterior.training_noise import training_noise
from bayesdiff_ext.sampler import BayesDiffOutput
from bayesdiff_ext.randomness import ImageStreams, independent_generator
from bayesdiff_ext.sampler.settings import UNCERTAINTY_ARGUMENTS as SETTINGS_ARGUMENTS

__all__ = [
    "OWN_LOOP",
    "PER_IMAGE_ARGUMENTS",
    "UNCERTAINTY_ARGUMENTS",
    "BayesDiffPipeline",
    "Conditioning",
    "WrapperOptions",
    "decode_stream",
    "per_image",
    "with_stock_arguments",
    "refuse_extra_kwargs",
    "unit_noise",
]

#: The sampler's uncertainty arguments, keyword-only in every wrapper's ``__call__``; None (their
#: default there) means "not given": :func:`~bayesdiff_ext.sampler.settings.resolve_settings` fills
#: them from the preset, so the defaults live in one place.
UNCERTAINTY_ARGUMENTS = ("preset", "settings", *SETTINGS_ARGUMENTS)

#: Conditioning arguments that hold one value per image (a single value is repeated for a batch).
PER_IMAGE_ARGUMENTS = (
    "prompt",
    "prompt_2",
    "prompt_3",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
    "class_labels",
)

#: Why a wrapper refuses ``callback_on_step_end``.
OWN_LOOP = (
    "the loop is the sampler's; to keep the stock loop and your callbacks, pass "
    "bayesdiff_ext.UncertaintyCallback to the stock pipeline instead"
)

# Separates the decode draws' stream from the sampler's Monte Carlo stream seeded from the same generator.
_DECODE_STREAM = 0x5DEECE66D

_UNCERTAINTY_DOC = """
        Uncertainty (keyword-only; None means not given, see `bayesdiff_ext.sampler.settings.resolve_settings`):
            preset (`str`, *optional*): `'fast'` (the default: trajectory Monte Carlo, 16 weight draws),
                `'accurate'` (64 draws; 64 noise streams on a stochastic sampler) or `'paper'`
                (BayesDiff's moment recurrence, Skip 5, S = 10).
            settings (`UncertaintySettings`, *optional*): settings made before.
            estimator (`str`, *optional*): `'trajectories'`, `'linearised'` or `'recurrence'`.
            samples, draws, centre, noise_samples, chunk_size, control_variate (*optional*): the
                trajectory estimators' weight draws per image, their kind (`'independent'`,
                `'antithetic'`, `'sobol'`), their centre (`'map'`, `'mean'`), the noise streams of a
                stochastic sampler, rows per model call, the feedback-free control variate.
            shared_draws, weight_seed (*optional*): the trajectory estimators' draws (and noise streams) are
                the same for every image, from `weight_seed` (default `True`, seed 0: the images' scores
                compare, docs/MATH.md §14.10), or with `shared_draws=False` each image's own.
            uq_every, mc_samples, covariance, eps_variance, skip, clamp, mode (*optional*): the
                recurrence's Skip, Monte Carlo samples, covariance (`'mc'`, `'regression'`, `'none'`),
                ε variance (`'total'`, `'bayesdiff'`), what runs between uncertainty steps, clamping,
                and `'deterministic'` (images bitwise the stock call's) or `'bayesdiff'` (the paper's
                sampled trajectory).
            return_trace (`bool`, *optional*, defaults to `False`): keep one record per scheduler step
                (the recurrence)."""

_GUIDANCE_DOC = """
            guidance_variance (`str`, *optional*, defaults to `'exact'`): the variance of the guided
                prediction: `'exact'`, the head's at φ_cfg (both branches share the head weights), or
                `'independent'`, BayesDiff's (1−s)²·V_u + s²·V_c."""

_DECODE_DOC = """
            decode_samples (`int`, *optional*, defaults to 16): Gaussian draws of z_0 per image decoded through
                the pipeline's own VAE path for `pixel_variance` (0: none). Methods weight-samples and
                x0-drift decode their own M final latents or L predictions x̂₀ instead (0: none).
            decode_batch_size (`int`, *optional*, defaults to 8): draws per VAE decode.
            decode_generator (`torch.Generator`, *optional*): the draws' stream (default: seeded from
                `generator` without consuming it; one stream per image for a list of per-image generators)."""

_RETURNS_DOC = """
        Returns:
            [`~bayesdiff_ext.BayesDiffOutput`] or `tuple`: `.images` exactly as the stock call returns them
            (bitwise, with `mode='deterministic'`), `.variance`/`.mean` (the latents' Var/E[z_0], float32,
            in the pipeline's latent layout), `.aleatoric_variance`/`.epistemic_variance`, `.scores` (B,),
            `.pixel_variance` (B, 3, H, W), `.pixel_scores` and `.pixel_mean` through the VAE (weight-samples
            and x0-drift: of their decoded images), `.feature_entropy` (weight-samples with `features`),
            `.settings`, `.timings`, `.trace`. With `return_dict=False`: the stock tuple followed by `(variance, pixel_variance)`.
"""


@dataclass(frozen=True)
class WrapperOptions:
    """The arguments a wrapper's ``__call__`` adds to the stock ones."""

    uncertainty: dict[str, Any]
    return_trace: bool = False
    guidance_variance: str = "exact"
    decode_samples: int = 16
    decode_batch_size: int = 8
    decode_generator: torch.Generator | None = None


@dataclass(frozen=True)
class Conditioning:
    """The model kwargs of a call's B rows: the conditional branch's, the unconditional branch's (None
    without guidance), the dtype of x_T (the prompt embeddings') and B."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    dtype: torch.dtype
    batch: int

    def guidance(self, scale: float, variance: str, layout: str = "uncond_first") -> ClassifierFreeGuidance | None:
        """The sampler's guidance for these branches (None without an unconditional branch)."""
        if self.uncond is None:
            return None
        return ClassifierFreeGuidance(scale, self.uncond, variance, layout)


class BayesDiffPipeline:
    """A stock diffusers pipeline and a posterior on its denoiser's head, called like the pipeline.

    Build it with :meth:`from_pipe`; call it with the stock pipeline's own arguments plus the
    uncertainty arguments (keyword-only; ``help(wrapper.__call__)`` lists both). It returns a
    :class:`~bayesdiff_ext.BayesDiffOutput` whose ``.images`` are the stock call's (bitwise, in
    ``mode='deterministic'``) with the variance of the latents, its aleatoric/epistemic split and
    pixel maps decoded through the pipeline's own VAE path. The prompt encoding, x_T, timesteps and
    decoding are the stock pipeline's own methods and arithmetic; the denoising loop is the
    sampler's, which runs the same model calls and scheduler steps. Nothing is copied or modified.
    ``from_pipe(pipe, posterior, method='weight-samples')`` or ``from_pipe(pipe, method='x0-drift')``
    runs those detection scores in the same loop instead, their maps and feature entropy taken on the
    decoded images (:mod:`bayesdiff_ext.pipelines.method`).

    It behaves as the pipeline: ``.to()`` moves the pipeline and returns the wrapper; ``.device``,
    ``.dtype``, ``.components``, the components (``.vae``, ``.scheduler``, ...),
    ``set_progress_bar_config`` and ``enable_model_cpu_offload`` are the pipeline's.

    Wrapped, each with its default scheduler: ``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
    ``PixArtSigmaPipeline``, ``DiTPipeline``, ``DDPMPipeline``, ``DDIMPipeline``. The default preset
    (trajectory Monte Carlo) and the linearised estimator run any scheduler's own step, multistep
    ones included (SD 1.5's PNDM, PixArt-Σ's DPM-Solver++ 2M); the moment recurrence
    (``preset='paper'``) refuses multistep schedulers with a ValueError naming them.
    """

    #: Every wrapper registers itself by declaring ``class BayesDiffXPipeline(BayesDiffPipeline, wraps=XPipeline)``.
    _wrappers: ClassVar[dict[type, type[BayesDiffPipeline]]] = {}
    #: The wrapped stock pipeline class.
    stock: ClassVar[type]
    #: The pipeline attribute holding the denoiser the posterior is on.
    denoiser_name: ClassVar[str] = "unet"
    #: Whether the call takes ``guidance_variance`` (classifier-free guidance) and the decode options.
    guided: ClassVar[bool] = True
    latent: ClassVar[bool] = True
    #: Whether the conditioning is a text prompt (the empty prompt when a fit gives none).
    prompted: ClassVar[bool] = True
    #: Stock arguments that cannot be followed, refused when they differ from the stock default.
    unsupported: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, *, wraps: type | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if wraps is not None:
            BayesDiffPipeline._wrappers[wraps] = cls
            cls.stock = wraps
            cls.__call__ = _wrapper_call(cls, wraps)

    def __init__(self, pipe, posterior=None, method: str = "laplace", **method_options) -> None:
        if type(self) is BayesDiffPipeline:
            raise TypeError("build it with BayesDiffPipeline.from_pipe(pipe, posterior)")
        self.pipe = pipe
        self.method = PipelineMethod(method, latent=self.latent, **method_options)
        if posterior is None and self.method.needs_posterior:
            raise ValueError(f"method {method!r} needs a fitted posterior (posterior=LastLayerLaplace(...))")
        # A posterior fitted on a copy of the denoiser (another device or dtype) moves onto this one.
        self.posterior = None if posterior is None else posterior.for_model(self._denoiser)

    @classmethod
    def from_pipe(cls, pipe, posterior=None, *, method: str = "laplace", **method_options) -> BayesDiffPipeline:
        """The wrapper registered for ``pipe``'s class (or its nearest registered base class).

        Args:
            pipe: a stock diffusers pipeline of a wrapped class.
            posterior (*optional*): a posterior on the pipeline's denoiser head (every method but x0-drift).
            method (`str`, defaults to `'laplace'`): what the call estimates with the pipeline's own
                conditioning, loop and decode path: ``'laplace'`` (the uncertainty arguments of the call),
                ``'weight-samples'`` (options ``samples``, ``features``, ``weight_seed``) or ``'x0-drift'``
                (option ``last_steps``); see :mod:`bayesdiff_ext.pipelines.method`.
        """
        for stock in type(pipe).__mro__:
            if stock in BayesDiffPipeline._wrappers:
                return BayesDiffPipeline._wrappers[stock](pipe, posterior, method, **method_options)
        names = ", ".join(sorted(stock.__name__ for stock in BayesDiffPipeline._wrappers))
        raise TypeError(
            f"BayesDiffPipeline wraps {names}; got {type(pipe).__name__}. For another pipeline with "
            "callback_on_step_end, pass bayesdiff_ext.UncertaintyCallback to its call"
        )

    # ------------------------------------------------------------------ the pipeline's conventions
    def to(self, *args, **kwargs) -> BayesDiffPipeline:
        """``pipe.to(...)``, and a fitted Laplace posterior's curvature to the head's device; returns this wrapper."""
        self.pipe.to(*args, **kwargs)
        if getattr(self.posterior, "posterior", None) is not None and hasattr(self.posterior, "to"):
            self.posterior.to()  # LastLayerLaplace.to: the head's device and dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def components(self) -> dict[str, Any]:
        return self.pipe.components

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def enable_model_cpu_offload(self, *args, **kwargs) -> None:
        self.pipe.enable_model_cpu_offload(*args, **kwargs)

    def __getattr__(self, name: str):
        # The pipeline's components and methods (vae, scheduler, maybe_free_model_hooks, ...).
        if name.startswith("__") or name in ("pipe", "posterior", "method"):
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__}, {self.posterior!r})"

    # ------------------------------------------------------------------ the call
    def __call__(self, *args, **kwargs) -> BayesDiffOutput | tuple:
        raise TypeError("build it with BayesDiffPipeline.from_pipe(pipe, posterior)")

    def _generate(self, call: dict[str, Any], extra: dict[str, Any], options: WrapperOptions):
        """The wrapper's body: ``call`` holds every stock argument (defaults applied), ``extra`` the stock
        ``**kwargs``."""
        raise NotImplementedError

    @property
    def _denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    def _sample(self, noise, num_inference_steps: int, generator, eta: float, options: WrapperOptions, **extra):
        """The sampler's loop with the pipeline's own denoiser, scheduler and progress-bar setting."""
        progress = not getattr(self.pipe, "_progress_bar_config", {}).get("disable", False)
        sampler = self.method.sampler(self._denoiser, self.pipe.scheduler, self.posterior)
        return self.method.run(
            sampler,
            options,
            noise=noise,
            num_inference_steps=num_inference_steps,
            generator=generator,
            eta=eta,
            progress=progress,
            **extra,
        )

    def default_size(self) -> tuple[int, int]:
        """The stock call's (height, width) in pixels when none is given."""
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def command_line_arguments(self) -> dict[str, Any]:
        """Stock call arguments the command line adds so that any saved model of this pipeline runs."""
        return {}

    def _size(self, call: dict[str, Any]) -> tuple[int, int]:
        default_height, default_width = self.default_size()
        return call["height"] or default_height, call["width"] or default_width

    def decoder(self, height: int | None = None, width: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The stock decode path: model-scale latents (the pipeline's layout) → images in the VAE's output
        range, as the stock call decodes them before post-processing. ``height`` × ``width`` (pixels)
        matter where the layout does not carry the size (Flux's packed tokens)."""
        return self._decode

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, call: dict[str, Any], guided: bool, height: int, width: int) -> Conditioning:
        """The model kwargs of both branches from the stock conditioning arguments (the stock encoders)."""
        raise NotImplementedError

    def _encoding(self, guided: bool, attention: dict[str, Any] | None) -> dict[str, Any]:
        """The arguments of the stock ``encode_prompt`` that are not the call's own: the device, whether to
        encode the negative branch, the LoRA scale of the attention kwargs."""
        return {
            "device": self.pipe._execution_device,
            "do_classifier_free_guidance": guided,
            "lora_scale": attention.get("scale", None) if attention is not None else None,
        }

    # ------------------------------------------------------------------ fitting (pipelines.fitting)
    def stock_arguments(self, **given: Any) -> dict[str, Any]:
        """Every argument of the stock ``__call__`` with its default, ``given`` ones replaced."""
        parameters = inspect.signature(self.stock.__call__).parameters
        call = {
            name: p.default
            for name, p in parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        unknown = sorted(set(given) - set(call))
        if unknown:
            raise TypeError(f"{self.stock.__name__}.__call__ has no argument(s) {unknown}")
        return {**call, **given}

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [−1, 1] → model-scale latents in the pipeline's layout (a draw from the encoder)."""
        return latent.encode_images(self.pipe.vae, images, generator)

    def training_noise(self, latents: torch.Tensor):
        """The noise the denoiser was trained with, for ``LastLayerLaplace.fit`` on ``latents``."""
        return training_noise(self.pipe.scheduler)

    def fit_conditioning(self, given: dict[str, Any], height: int, width: int, batch: int) -> dict[str, Any]:
        """The conditional model kwargs of ``batch`` training images of ``height`` × ``width`` pixels."""
        if self.prompted and given.get("prompt") is None and given.get("prompt_embeds") is None:
            given = {**given, "prompt": [""] * batch}  # unconditional training rows
        return self._encode(self.stock_arguments(**given), False, height, width).cond

    def _finish(
        self,
        result: BayesDiffOutput,
        call: dict[str, Any],
        options: WrapperOptions,
        guidance_scale: float | None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        finish_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BayesDiffOutput | tuple:
        """The stock ending of a latent pipeline: the latents for ``output_type='latent'``, else decoded
        (``decode``, then ``finish_image`` on the image only) and post-processed; then the maps."""
        decode = decode or self.decoder()
        image = result.images
        if call["output_type"] != "latent":
            image = decode(result.images)
            image = image if finish_image is None else finish_image(image)
            image = self.pipe.image_processor.postprocess(image, output_type=call["output_type"])
        return self._output(
            result, image, options, call["generator"], return_dict=call["return_dict"], stock_tuple=(image,),
            guidance_scale=guidance_scale, decode=decode,
        )

    def _output(
        self,
        result: BayesDiffOutput,
        image,
        options: WrapperOptions,
        generator,
        *,
        return_dict: bool,
        stock_tuple: tuple,
        guidance_scale: float | None = None,
        nsfw=None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BayesDiffOutput | tuple:
        """The wrapper's return value: pixel moments through :meth:`_decode` (the method's), then the stock
        images and the maps."""
        pixel_variance, pixel_scores, pixel_mean = (
            (None, None, None) if self.latent else (result.variance, result.scores, result.mean)
        )
        entropy = result.feature_entropy
        started = time.perf_counter()
        if self.latent and options.decode_samples:
            pixels, entropy = self.method.pixels(
                result,
                decode or self.decoder(),
                options.decode_samples,
                options.decode_batch_size,
                options.decode_generator or decode_stream(generator, result.mean.device),
            )
            pixel_variance, pixel_scores, pixel_mean = pixels.variance, pixels.scores, pixels.mean
        if result.mean.device.type == "cuda":
            torch.cuda.synchronize(result.mean.device)
        self.pipe.maybe_free_model_hooks()
        settings = dict(result.settings)
        if self.guided:
            guided = guidance_scale is not None
            settings.update(
                guidance_scale=float(guidance_scale) if guided else None,
                guidance_variance=options.guidance_variance if guided else None,
            )
        if self.latent:
            settings.update(self.method.settings(options.decode_samples))
        if not return_dict:
            return (*stock_tuple, result.variance, pixel_variance)
        return BayesDiffOutput(
            images=image,
            variance=result.variance,
            mean=result.mean,
            scores=result.scores,
            aleatoric_variance=result.aleatoric_variance,
            pixel_variance=pixel_variance,
            pixel_scores=pixel_scores,
            pixel_mean=pixel_mean,
            feature_entropy=entropy,
            nsfw_content_detected=nsfw,
            trace=result.trace,
            settings=settings,
            timings=dict(result.timings, pixel_decode_s=time.perf_counter() - started),
        )


def unit_noise(pipe, size, dtype, device, generator, latents) -> torch.Tensor:
    """``prepare_latents``' draw (or the given ``latents``) before its scaling by ``init_noise_sigma``:
    ``size`` is (B, C, height, width) in pixels, the latents (B, C, height/f, width/f)."""
    batch, channels, height, width = size
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
            f" size of {batch}. Make sure the batch size matches the length of the generators."
        )
    if latents is not None:
        return latents.to(device)
    shape = (batch, channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def with_stock_arguments(method: Callable, call: dict[str, Any], **given: Any):
    """``method(...)`` (a stock pipeline method such as ``encode_prompt``) with the arguments of the stock
    call it takes by the same name, ``given`` ones replacing them."""
    names = [n for n, p in inspect.signature(method).parameters.items() if p.kind is not p.VAR_KEYWORD]
    return method(**{**{name: call[name] for name in names if name in call}, **given})


def per_image(value, rows: int):
    """A per-image conditioning value for ``rows`` images: a single value (a string, a class label)
    repeated, a list or tensor of ``rows`` as it is."""
    return [value] * rows if isinstance(value, (str, int)) and not isinstance(value, bool) else value


def refuse_extra_kwargs(extra: dict[str, Any]) -> None:
    """The stock ``**kwargs`` hold only the deprecated ``callback``/``callback_steps``: refuse those and anything else."""
    if "callback" in extra or "callback_steps" in extra:
        raise ValueError(
            "step callbacks are not supported by BayesDiffPipeline (its loop is the sampler's); to keep the "
            "stock loop and your callbacks, pass bayesdiff_ext.UncertaintyCallback to the stock pipeline instead"
        )
    if extra:
        raise TypeError(f"unexpected keyword arguments: {sorted(extra)}")


def decode_stream(generator, device: torch.device) -> torch.Generator | list[torch.Generator]:
    """The decode draws' generators, seeded from ``generator`` without consuming it: for a list of
    per-image generators one per image (the ``'decode'`` stream of :mod:`bayesdiff_ext.randomness`,
    so an image's pixel map does not depend on its batch), else one for the batch."""
    if isinstance(generator, list):
        return ImageStreams.derived(generator, len(generator), torch.device("cpu"), "decode").generators
    seed = independent_generator(generator, device).initial_seed() ^ _DECODE_STREAM
    return torch.Generator(device=device).manual_seed(seed % 2**63)


def _wrapper_call(cls: type[BayesDiffPipeline], stock: type):
    """``cls.__call__``: the stock signature and docstring plus the uncertainty arguments."""
    stock_signature = inspect.signature(stock.__call__)
    parameters = [p for p in stock_signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    stock_kwargs = next((p for p in stock_signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    ours, option_names = _uncertainty_parameters(cls.guided, cls.latent)
    signature = stock_signature.replace(
        parameters=parameters + ours + ([stock_kwargs] if stock_kwargs else []),
        return_annotation="BayesDiffOutput | tuple",
    )
    stock_defaults = {
        name: p.default for name, p in stock_signature.parameters.items() if p.default is not p.empty
    }

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        del call["self"]
        extra = call.pop(stock_kwargs.name, {}) if stock_kwargs else {}
        uncertainty = {name: call.pop(name) for name in UNCERTAINTY_ARGUMENTS}
        options = WrapperOptions(
            uncertainty={name: value for name, value in uncertainty.items() if value is not None},
            return_trace=call.pop("return_trace"),
            **{name: call.pop(name) for name in option_names},
        )
        check_guidance_variance(options.guidance_variance)
        for name, reason in cls.unsupported.items():
            if _given(call[name], stock_defaults.get(name)):
                raise ValueError(f"{name}={_short(call[name])} is not supported by {cls.__name__}: {reason}")
        with torch.no_grad():
            return self._generate(call, extra, options)

    __call__.__signature__ = signature
    __call__.__qualname__ = f"{cls.__name__}.__call__"
    __call__.__module__ = cls.__module__
    __call__.__doc__ = _call_doc(cls, stock)
    return __call__


def _uncertainty_parameters(guided: bool, latent: bool) -> tuple[list[inspect.Parameter], tuple[str, ...]]:
    """The keyword-only parameters a wrapper adds to the stock call, and the names of its options among them."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter(name, keyword, default=None) for name in UNCERTAINTY_ARGUMENTS]
    parameters.append(inspect.Parameter("return_trace", keyword, default=False, annotation=bool))
    defaults = WrapperOptions(uncertainty={})
    names = (("guidance_variance",) if guided else ()) + (
        ("decode_samples", "decode_batch_size", "decode_generator") if latent else ()
    )
    parameters += [inspect.Parameter(name, keyword, default=getattr(defaults, name)) for name in names]
    return parameters, names


def _call_doc(cls, stock) -> str:
    """The wrapper's summary, the stock call's Args, the uncertainty arguments and the return value."""
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    stock_doc = stock.__call__.__doc__ or ""
    start = stock_doc.find("Args:")
    end = min((i for i in (stock_doc.find("Examples:", start), stock_doc.find("Returns:", start)) if i > 0), default=-1)
    stock_args = stock_doc[start:end].rstrip() if start >= 0 else "Args:"
    return _doc(summary, stock_args, cls.guided, cls.latent)


def _doc(summary: str, stock_args: str, guided: bool, latent: bool) -> str:
    options = (_GUIDANCE_DOC if guided else "") + (_DECODE_DOC if latent else "")
    return f"{summary}\n\n        {stock_args}\n{_UNCERTAINTY_DOC}{options}\n{_RETURNS_DOC}"


# BayesDiffPipeline.__call__ itself: what every wrapper's call takes, for help(BayesDiffPipeline.__call__).
BayesDiffPipeline.__call__.__signature__ = inspect.Signature(
    [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("stock_arguments", inspect.Parameter.VAR_POSITIONAL),
        *_uncertainty_parameters(True, True)[0],
        inspect.Parameter("stock_keyword_arguments", inspect.Parameter.VAR_KEYWORD),
    ],
    return_annotation="BayesDiffOutput | tuple",
)
BayesDiffPipeline.__call__.__doc__ = _doc(
    "The stock pipeline's call with uncertainty; each wrapper's ``__call__`` has the stock signature (see\n"
    "    ``help(BayesDiffPipeline.from_pipe(pipe, posterior).__call__)``) followed by these keyword-only arguments.",
    "Args:\n            stock_arguments, stock_keyword_arguments: the wrapped pipeline's own ``__call__`` arguments.",
    True,
    True,
)


def _given(value, default) -> bool:
    """Whether a stock argument was set to something other than its default (None, 0 and False alike)."""
    if isinstance(value, torch.Tensor):
        return True
    return not (same_value(value, default) or (not default and not value))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

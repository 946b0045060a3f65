"""BayesDiffPipeline: an existing diffusers pipeline, called as usual, with BayesDiff uncertainty."""

from __future__ import annotations

from typing import Any, ClassVar

from bayesdiff_ext.sampler import BayesDiffOutput, BayesDiffSampler

__all__ = ["BayesDiffPipeline"]

# The sampler's uncertainty arguments, keyword-only in every wrapper's ``__call__``.
UNCERTAINTY_ARGUMENTS = (
    "uq_every", "mc_samples", "covariance", "eps_variance", "skip", "clamp", "mode", "return_trace"
)


def uncertainty_arguments(call_arguments: dict[str, Any]) -> dict[str, Any]:
    """The uncertainty arguments picked from a wrapper's ``__call__`` arguments (its ``locals()``)."""
    return {name: call_arguments[name] for name in UNCERTAINTY_ARGUMENTS}


class BayesDiffPipeline:
    """Wraps a ``DDPMPipeline``, ``DDIMPipeline`` or ``StableDiffusionPipeline`` and a posterior on its head.

    Build it with :meth:`from_pipe`; call it with the stock pipeline's own arguments plus the
    uncertainty arguments of :class:`~bayesdiff_ext.BayesDiffSampler` (``uq_every``,
    ``mc_samples``, ``covariance``, ``eps_variance``, ``skip``, ``clamp``, ``mode``,
    ``return_trace``) and, for Stable Diffusion, ``guidance_variance``, ``decode_samples``,
    ``decode_batch_size`` and ``decode_generator``. It returns a
    :class:`~bayesdiff_ext.pipelines.BayesDiffPipelineOutput`: the stock ``.images`` (identical to the
    stock call's in ``mode='deterministic'``) plus ``.variance``, ``.pixel_variance``, ``.scores``,
    ``.pixel_scores``. The loop is the sampler's; the pipeline's components are used as they are
    (nothing is copied or modified); a posterior fitted on a copy of the UNet moves onto this one
    (``LastLayerLaplace.for_model``). The scheduler must be one the sampler supports (DDIM, DDPM,
    DPM-Solver singlestep, with ``clip_sample=False``).
    """

    #: The stock pipeline class each wrapper wraps: every wrapper registers itself by declaring
    #: ``class BayesDiffXPipeline(BayesDiffPipeline, wraps=XPipeline)``.
    _wrappers: ClassVar[dict[type, type[BayesDiffPipeline]]] = {}

    def __init_subclass__(cls, *, wraps: type | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if wraps is not None:
            BayesDiffPipeline._wrappers[wraps] = cls

    def __init__(self, pipe, posterior) -> None:
        if type(self) is BayesDiffPipeline:
            raise TypeError("build it with BayesDiffPipeline.from_pipe(pipe, posterior)")
        self.pipe = pipe
        self.posterior = posterior.for_model(pipe.unet)

    @classmethod
    def from_pipe(cls, pipe, posterior) -> BayesDiffPipeline:
        """The wrapper registered for ``pipe``'s class (or its nearest registered base class):
        DDPMPipeline, DDIMPipeline or StableDiffusionPipeline."""
        for stock in type(pipe).__mro__:
            if stock in BayesDiffPipeline._wrappers:
                return BayesDiffPipeline._wrappers[stock](pipe, posterior)
        raise TypeError(
            "BayesDiffPipeline wraps a DDPMPipeline, DDIMPipeline or StableDiffusionPipeline, "
            f"got {type(pipe).__name__}; "
            "for another SD-family pipeline use bayesdiff_ext.UncertaintyCallback as its callback_on_step_end"
        )

    def _sample(
        self, noise, num_inference_steps: int, generator, eta: float, uncertainty: dict[str, Any], **extra
    ) -> BayesDiffOutput:
        """The sampler's loop with the pipeline's own UNet, scheduler and progress-bar setting."""
        progress = not getattr(self.pipe, "_progress_bar_config", {}).get("disable", False)
        sampler = BayesDiffSampler(self.pipe.unet, self.pipe.scheduler, self.posterior)
        return sampler.sample(
            noise=noise,
            num_inference_steps=num_inference_steps,
            generator=generator,
            eta=eta,
            progress=progress,
            **uncertainty,
            **extra,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__}, {self.posterior!r})"

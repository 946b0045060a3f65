"""The model with a posterior on its head, called as the step engine needs it (docs/MATH.md §2).

What a model call means is decided here once, for the image path and the Monte Carlo batch alike:

* the model is called through :class:`~bayesdiff_ext.denoiser.Denoiser` (UNets and transformers:
  sample argument by name, timestep by keyword);
* it sees ``scheduler.scale_model_input(x, t)`` where the scheduler has one (Euler: x/√(σ²+1)) while the moments and the
  Monte Carlo draws stay in the scheduler's own space; the Monte Carlo samples are scaled for step
  ``index`` by the scheduler's description, whichever step the scheduler itself is at (a step-end
  callback runs after the scheduler has moved on);
* classifier-free guidance runs both branches in one call and the head's variance is that of the
  guided prediction (:class:`~bayesdiff_ext.guidance.ClassifierFreeGuidance`);
* the prediction is the part of the output the scheduler steps with (learned-variance channels
  dropped), and the head's closed-form moments come from ``posterior.predict`` at the captured φ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from bayesdiff_ext.denoiser import Denoiser, stepped_prediction
from bayesdiff_ext.guidance import ClassifierFreeGuidance, guided_head_moments
from bayesdiff_ext.sampler.schedulers import describe

__all__ = ["ModelCall", "head_moments", "scaled_model_input"]


def head_moments(posterior, phi: torch.Tensor, guidance: ClassifierFreeGuidance | None):
    """The head's (mean, var) at φ; under guidance, of the guided prediction from a [uncond; cond] φ."""
    if guidance is None:
        return posterior.predict(phi)
    return guided_head_moments(posterior, phi, guidance.scale, guidance.variance)


def scaled_model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """``scheduler.scale_model_input(x, t)``, or ``x`` for a scheduler without one (flow matching)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


class ModelCall:
    """``model`` (a diffusers UNet or transformer), ``scheduler`` and ``posterior`` on the model's head.

    The posterior needs ``capture()`` and ``predict(phi)`` returning (mean, var) shaped like the
    model's prediction (see :class:`~bayesdiff_ext.LastLayerLaplace`). One with ``for_model(model)``
    is moved onto ``model``'s head first: a posterior follows copies of its model (``copy.deepcopy``,
    another device or dtype).
    """

    def __init__(self, model, scheduler, posterior) -> None:
        self.denoiser = Denoiser(model)
        self.scheduler = scheduler
        for_model = getattr(posterior, "for_model", None)
        self.posterior = posterior if for_model is None else for_model(model)
        self._capture = None

    def __call__(
        self,
        x: torch.Tensor,
        t,
        kwargs: Mapping[str, Any],
        *,
        want_head: bool,
        guidance: ClassifierFreeGuidance | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """At the image sample ``x`` (the scheduler's space): the prediction the scheduler steps with
        (the model's dtype) and, with ``want_head``, the head's variance there (else None).

        ``kwargs`` are the conditioning of the B rows (under guidance: ``guidance.branch_kwargs(...)``).
        """
        return self.outputs(x, t, kwargs, want_head=want_head, guidance=guidance)[1:]

    def outputs(
        self,
        x: torch.Tensor,
        t,
        kwargs: Mapping[str, Any],
        *,
        want_head: bool,
        guidance: ClassifierFreeGuidance | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As calling this object, with the model's full output first (learned-variance channels included)."""
        out, _, head_var = self._forward(self.model_input(x, t), t, kwargs, want_head, guidance)
        prediction = stepped_prediction(out, x)
        if head_var is not None and head_var.shape != prediction.shape:
            raise ValueError(
                f"the posterior predicts a variance of shape {tuple(head_var.shape)} but the model's prediction "
                f"has shape {tuple(prediction.shape)}: is the posterior on this model's head?"
            )
        return out, prediction, head_var

    def head_at(
        self,
        samples: torch.Tensor,
        t,
        kwargs: Mapping[str, Any],
        dtype: torch.dtype,
        guidance: ClassifierFreeGuidance | None = None,
        *,
        index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head (mean, var) at S samples of x, (S, B, ...), through one model call on S·B (2·S·B guided) rows.

        ``kwargs`` are for the B images; they are tiled here. The samples are in the scheduler's
        space and scaled here for the model at step ``index`` of ``scheduler.timesteps``; the
        moments come back in ``dtype``.
        """
        repeats, batch = samples.shape[:2]
        flat = describe(self.scheduler).model_input(samples.flatten(0, 1).to(self.denoiser.dtype), index)
        tiled = Denoiser.tile(kwargs, batch, repeats)
        _, head_mean, head_var = self._forward(flat, t, tiled, True, guidance)
        return (
            head_mean.to(dtype).unflatten(0, (repeats, batch)),
            head_var.to(dtype).unflatten(0, (repeats, batch)),
        )

    def model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """:func:`scaled_model_input` with this call's scheduler."""
        return scaled_model_input(self.scheduler, x, t)

    def _forward(self, x, t, kwargs, want_head: bool, guidance: ClassifierFreeGuidance | None):
        """One model call (both guidance branches in it): its output and, with ``want_head``, the
        head's closed-form (mean, var) at φ (at φ_cfg under guidance)."""
        if guidance is not None:
            return guidance.forward(self.denoiser, self.posterior, x, t, kwargs, want_head)
        if not want_head:
            return self.denoiser(x, t, kwargs), None, None
        if self._capture is not None:
            out = self.denoiser(x, t, kwargs)
            return (out, *head_moments(self.posterior, self._capture.phi, None))
        with self.posterior.capture() as cap:
            out = self.denoiser(x, t, kwargs)
        return (out, *head_moments(self.posterior, cap.phi, None))

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Keep one hook on the head for a whole loop instead of one per model call: a step then
        registers no hook, which ``torch.compile(fullgraph=True)`` and CUDA graphs need."""
        with self.posterior.capture() as capture:
            self._capture = capture
            try:
                yield
            finally:
                self._capture = None

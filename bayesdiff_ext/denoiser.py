"""One call convention for diffusers denoisers: UNets and transformers alike.

Every part of the package that runs the model — the fit's data loop, the moment recurrence, the
trajectory Monte Carlo, the pipeline front doors — calls it through :class:`Denoiser`, so the
differences between model families live in one place:

* the name of the sample argument (``sample`` for UNets, ``hidden_states`` for transformers);
* the timestep a pipeline hands the model: UNets take the scheduler's timestep as it is (a 0-d
  tensor is broadcast inside the model); transformer pipelines expand it to the batch first, and
  Flux divides it by 1000 (``FluxPipeline`` calls ``transformer(timestep=t / 1000, ...)``);
* reading the prediction out of the model's return value (``.sample``, a tuple, or a tensor).

The output is returned in full: learned-variance channels are kept (the caller slices the ε
channels it needs) and a transformer's output is already unpatchified by the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Denoiser", "model_prediction", "repeat_batch", "stepped_prediction"]

# Transformers whose pipelines pass ``timestep / 1000``: the model embeds σ·1000 / 1000 = σ.
_TIMESTEP_PER_MILLE = ("FluxTransformer2DModel",)
# Conditioning without a batch dimension (Flux's rotary position ids).
_UNBATCHED_KWARGS = ("img_ids", "txt_ids")


def model_prediction(out) -> torch.Tensor:
    """The prediction tensor of a diffusers output object, a tuple, or a plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read the prediction from a model output of type {type(out).__name__}")


def stepped_prediction(output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The part of a model output the scheduler steps with: shaped like ``sample``.

    All of it when the shapes agree; the leading C channels (dim 1) of a learned-variance output
    with 2·C channels (DiT, PixArt, DeepFloyd IF, Kandinsky), as their pipelines split it.
    """
    if output.shape == sample.shape:
        return output
    channels = sample.shape[1] if sample.dim() > 1 else None
    learned_variance = (
        channels is not None
        and output.dim() == sample.dim()
        and output.shape[1] == 2 * channels
        and output.shape[:1] + output.shape[2:] == sample.shape[:1] + sample.shape[2:]
    )
    if not learned_variance:
        raise ValueError(
            f"the model's output {tuple(output.shape)} is neither shaped like its sample {tuple(sample.shape)} "
            "nor a learned-variance output with twice its channels"
        )
    return output[:, :channels]


def repeat_batch(value: Any, batch: int, repeats: int) -> Any:
    """Tile every tensor whose leading dimension is ``batch`` ``repeats`` times along it.

    The Monte Carlo samples are laid out sample-major, (S·B, ...) with row s·B + b, so conditioning
    (``encoder_hidden_states``, ``class_labels``, nested ``added_cond_kwargs``) is tiled, not
    interleaved. Anything else (scalars, broadcast tensors, flags) passes through unchanged.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(repeats, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, dict):
        return {key: repeat_batch(item, batch, repeats) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_batch(item, batch, repeats) for item in value)
    return value


class Denoiser:
    """Calls ``model`` the way its diffusers pipeline does.

    Args:
        model (`nn.Module`):
            A diffusers denoiser (``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, …) or
            any module whose ``forward`` takes the noisy sample first and a ``timestep`` keyword.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        parameters = inspect.signature(model.forward).parameters
        if "timestep" not in parameters:
            raise ValueError(
                f"{type(model).__name__}.forward has no `timestep` argument; "
                "expected a diffusers UNet or transformer denoiser"
            )
        self.model = model
        self.sample_argument = next(iter(parameters))
        self.expands_timestep = self.sample_argument == "hidden_states"
        self.timestep_divisor = 1000 if type(model).__name__ in _TIMESTEP_PER_MILLE else 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def model_timestep(self, timestep, batch: int) -> Any:
        """The timestep argument as the model's pipeline passes it, for ``batch`` rows."""
        if not self.expands_timestep:
            return timestep
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=self.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(self.device)
        timestep = timestep.expand(batch)
        return timestep / self.timestep_divisor if self.timestep_divisor != 1 else timestep

    def __call__(self, sample: torch.Tensor, timestep, model_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The model's prediction at ``sample`` (already scaled by ``scheduler.scale_model_input``).

        Args:
            sample (`torch.Tensor` of shape `(B, ...)`): the model input in the scheduler's layout.
            timestep: the scheduler's timestep (a number, a 0-d tensor or a `(B,)` tensor).
            model_kwargs (`dict`, *optional*): conditioning for the B rows, passed by keyword.

        Returns:
            `torch.Tensor` of shape `(B, ...)`: the raw prediction, all output channels.
        """
        kwargs = dict(model_kwargs or {})
        kwargs[self.sample_argument] = sample
        kwargs["timestep"] = self.model_timestep(timestep, sample.shape[0])
        return model_prediction(self.model(**kwargs))

    @staticmethod
    def tile(model_kwargs: Mapping[str, Any] | None, batch: int, repeats: int) -> dict[str, Any]:
        """Conditioning for ``repeats`` stacked copies of a batch (rows laid out copy-major).

        Flux's position ids (``img_ids`` (N, 3), ``txt_ids``) have no batch dimension and are never
        tiled, even when their token count happens to equal the batch.
        """
        kwargs = dict(model_kwargs or {})
        return {
            key: value if key in _UNBATCHED_KWARGS else repeat_batch(value, batch, repeats)
            for key, value in kwargs.items()
        }

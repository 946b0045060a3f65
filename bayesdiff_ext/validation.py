"""What users hand the package, checked at its doors: one rule per kind of input, one clear error.

``LastLayerLaplace.fit``, ``BayesDiffSampler.sample``, the pipelines and the ``bayesdiff`` command
check their inputs here before any work, so a bad input ends in a ``ValueError`` or ``TypeError``
that names the argument and what was expected, instead of an error from deep inside the model or a
silent wrong answer. The command line turns these into its one line ``bayesdiff: error: ...``
(exit status 2).

The rules:

* counts (steps, batch sizes, Monte Carlo samples) are integers (not bools, not floats) at least
  a minimum; numbers (η, guidance scales) are real and finite;
* tensors of data (images, noise) are floating point, finite and non-empty, and have the model's
  channels and a spatial size the model can take (:class:`SampleShape`);
* fitting images are at model scale: centred, like the [-1, 1] of a pixel model or a VAE's
  latents. Data that never goes below 0 is [0, 1] or [0, 255] image data and is refused, integer
  images too: :func:`pixels_to_model_scale` converts uint8 0..255 images by the stated rule;
* scheduler settings that make a step non-linear (:data:`NONLINEAR_SCHEDULER_SETTINGS`) are
  refused by the moment recurrence, which needs affine steps. This concerns the recurrence only: a
  method that runs the scheduler's own step (e.g. trajectory Monte Carlo) may keep them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "NONLINEAR_SCHEDULER_SETTINGS",
    "SampleShape",
    "check_count",
    "check_finite",
    "check_images",
    "check_noise",
    "check_number",
    "nonlinear_scheduler_settings",
    "pixels_to_model_scale",
    "sample_shape",
]

#: Scheduler settings that make a step non-linear in (sample, model output), and what each does.
NONLINEAR_SCHEDULER_SETTINGS = {
    "clip_sample": "clips x̂_0 to [-clip_sample_range, clip_sample_range]",
    "thresholding": "thresholds x̂_0 dynamically",
}

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_TO_MODEL_SCALE = (
    "convert uint8 0..255 images with bayesdiff_ext.validation.pixels_to_model_scale(images) "
    "(x / 127.5 - 1)"
)


# ------------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------------
def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` ≥ ``minimum``.

    Raises:
        `TypeError`: ``value`` is not an integer (a bool, a float such as 2.0, a string).
        `ValueError`: ``value`` < ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value: Any, minimum: float | None = None) -> float:
    """``value`` as a finite ``float`` (≥ ``minimum`` when given).

    Raises:
        `TypeError`: ``value`` is not a real number (a bool, a string, a tensor of several elements).
        `ValueError`: NaN, ±Inf, or below ``minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


# ------------------------------------------------------------------------------------------------
# tensors of data
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleShape:
    """What a model takes as its sample, from its config.

    ``channels`` and ``size`` (H, W) are the config's ``in_channels`` and ``sample_size`` (None where
    it does not say: Flux takes packed tokens); a sample's H and W must be multiples of ``multiple``
    (a UNet2DModel's downsampling, a transformer's patch size; 1 where the model takes any size).
    """

    channels: int | None = None
    size: tuple[int, int] | None = None
    multiple: int = 1

    @property
    def full(self) -> tuple[int, int, int] | None:
        """(C, H, W) of one sample, or None where the config does not give both."""
        if self.channels is None or self.size is None:
            return None
        return (self.channels, *self.size)


def sample_shape(model: torch.nn.Module) -> SampleShape:
    """The :class:`SampleShape` of a diffusers UNet or transformer (an empty one for other modules)."""
    config = getattr(model, "config", None)
    config = config if isinstance(config, Mapping) else {}  # diffusers' FrozenDict is a Mapping
    channels, size = config.get("in_channels"), config.get("sample_size")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
    if config.get("patch_size"):
        multiple = int(config["patch_size"])
    elif type(model).__name__ == "UNet2DModel":
        # every down block but the last halves H and W, and the up path must meet the skips again
        multiple = 2 ** (len(config["down_block_types"]) - 1)
    else:
        multiple = 1  # UNet2DConditionModel pads its up path itself
    return SampleShape(channels, size, multiple)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """ValueError if ``tensor`` holds NaN or ±Inf: how many, and the index of the first."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        value = tensor[first].item()
        raise ValueError(
            f"{name} must be finite, but holds {int(bad.sum())} NaN/Inf value(s), the first {value} at index "
            f"{first} of shape {tuple(tensor.shape)}"
        )


def _float_tensor(name: str, value: Any, hint: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}; {hint}")
    return value


def _check_layout(name: str, tensor: torch.Tensor, shape: SampleShape, *, exact_size: bool) -> None:
    """Dimensions, channels and spatial size of a batch of samples against the model's."""
    if tensor.dim() < 2 or tensor.shape[0] == 0 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(tensor.shape)}")
    full = shape.full
    if full is None:
        if shape.channels is not None and tensor.dim() == 4 and tensor.shape[1] != shape.channels:
            raise ValueError(
                f"{name} must have {shape.channels} channels (dim 1), got shape {tuple(tensor.shape)}"
            )
        return
    layout = f"(B, {full[0]}, H, W)"
    if tensor.dim() != 4 or tensor.shape[1] != full[0]:
        raise ValueError(f"{name} must have shape {layout} for this model, got {tuple(tensor.shape)}")
    spatial = tuple(tensor.shape[2:])
    if exact_size and spatial != full[1:]:
        raise ValueError(
            f"{name} are {spatial[0]}x{spatial[1]} but the model takes {full[1]}x{full[2]} samples "
            f"(its sample_size); resize them, e.g. torch.nn.functional.interpolate({name}, size={full[1:]}, "
            "mode='bilinear', antialias=True)"
        )
    if any(side % shape.multiple for side in spatial):
        raise ValueError(
            f"{name} has height and width {spatial}; this model takes multiples of {shape.multiple} "
            f"(e.g. its sample size {full[1]}x{full[2]})"
        )


def check_images(
    images: Any, shape: SampleShape, *, name: str = "images", check_range: bool = True
) -> torch.Tensor:
    """A batch of training images x_0 for the fit, checked; returned unchanged.

    Args:
        images: the batch, `(B, C, H, W)` at the model's `sample_size` (any layout of at least two
            dimensions where ``shape`` does not say, e.g. Flux's packed tokens).
        shape: the model's :class:`SampleShape`.
        name: the argument's name in messages.
        check_range: refuse data that never goes below 0 ([0, 1] or [0, 255] images; the model takes
            centred data at model scale). All-zero data passes.

    Raises:
        `TypeError`: not a tensor, or an integer tensor (with how to convert it).
        `ValueError`: empty, wrong dimensions, channels or size, NaN/Inf, or not at model scale.
    """
    _float_tensor(name, images, _TO_MODEL_SCALE)
    _check_layout(name, images, shape, exact_size=True)
    check_finite(name, images)
    if check_range:
        _check_centred(name, images)
    return images


def _check_centred(name: str, data: torch.Tensor) -> None:
    """ValueError for data that never goes below 0 but above: [0, 1] or [0, 255] images."""
    low, high = float(data.min()), float(data.max())
    if low >= 0 and high > 0:
        scale, fix = ("[0, 255]", "x / 127.5 - 1") if high > 1 else ("[0, 1]", "x * 2 - 1")
        raise ValueError(
            f"{name} range over [{low:.3g}, {high:.3g}], never below 0: that looks like {scale} image data, "
            f"but the model takes x_0 at model scale, centred ([-1, 1] for a pixel model): pass {fix}"
        )


def check_noise(noise: Any, shape: SampleShape, *, name: str = "noise") -> torch.Tensor:
    """The initial noise x_T (or latents) for the sampler, checked; returned unchanged.

    Any spatial size the model takes is allowed (a latent pipeline's height and width); the
    channels must be the model's.

    Raises:
        `TypeError`: not a floating-point tensor.
        `ValueError`: empty, wrong dimensions or channels, a size the model cannot take, NaN/Inf.
    """
    _float_tensor(name, noise, "draw it with torch.randn")
    _check_layout(name, noise, shape, exact_size=False)
    check_finite(name, noise)
    return noise


def pixels_to_model_scale(images: torch.Tensor, *, name: str = "images") -> torch.Tensor:
    """Images as users load them, at a pixel model's scale [-1, 1], float32.

    The rule: integer images (uint8, or any integer dtype holding 0..255) map by x / 127.5 − 1
    (0 → −1, 255 → 1); floating-point images must already be in [-1, 1] (up to 1e-3, then clamped)
    and go below 0 somewhere (floats in [0, 1] are refused, as by :func:`check_images`).

    Raises:
        `TypeError`: a bool or complex tensor.
        `ValueError`: integers outside 0..255, NaN/Inf, floats outside [-1, 1] or never below 0.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)})")
    if images.dtype in _INTEGER_DTYPES:
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer {name} range over [{low}, {high}]; expected 0..255")
        return images.to(torch.float32) / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"{name} have dtype {images.dtype}; expected integers 0..255 or floats in [-1, 1]")
    check_finite(name, images)
    data = images.to(torch.float32)
    low, high = float(data.min()), float(data.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"floating-point {name} range over [{low:.3g}, {high:.3g}]; they must be at model scale [-1, 1] "
            "(or give uint8 0..255)"
        )
    _check_centred(name, data)
    return data.clamp_(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# schedulers
# ------------------------------------------------------------------------------------------------
def nonlinear_scheduler_settings(config: Mapping[str, Any]) -> dict[str, str]:
    """The settings of :data:`NONLINEAR_SCHEDULER_SETTINGS` that ``config`` turns on, with what each does."""
    return {key: effect for key, effect in NONLINEAR_SCHEDULER_SETTINGS.items() if config.get(key, False)}

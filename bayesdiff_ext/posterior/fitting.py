"""The fitting data loop: noised training images through the model, φ from the hook, residuals.

For every batch of images x_0 and each of ``timesteps_per_image`` draws, the training noise
(:mod:`~bayesdiff_ext.posterior.training_noise`) gives (x_t, timestep, target); f = the ε channels
of the model's output at x_t (called through :class:`~bayesdiff_ext.denoiser.Denoiser`), r = f − target.
The accumulator of the chosen structure gets (φ, r), r moved to the head's output layout (a patch
transformer's residual is patchified back onto its token grid); the residual sum of squares gives
σ by maximum likelihood.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.output_layout import PatchLayout
from bayesdiff_ext.posterior.training_noise import training_noise
from bayesdiff_ext.validation import check_count, check_finite, check_images, sample_shape

ModelKwargs = Mapping[str, Any] | Callable[[torch.Tensor], Mapping[str, Any]] | None


class CurvatureAccumulator(Protocol):
    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None: ...


@dataclasses.dataclass
class FitStatistics:
    """What the posterior was fitted on; saved with it."""

    n_images: int = 0
    n_samples: int = 0  # images × timesteps: the data points of the likelihood
    timesteps_per_image: int = 1
    residual_elements: int = 0
    residual_sum_squares: float = 0.0

    def add(self, residual: torch.Tensor) -> None:
        self.n_samples += len(residual)
        self.residual_elements += residual.numel()
        self.residual_sum_squares += float(residual.to(torch.float64).square().sum())


def image_batches(images, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    """Batches of x_0 from a tensor (N, C, H, W), a Dataset or a DataLoader, and their count."""
    if isinstance(images, torch.Tensor):
        if images.dim() < 2:
            raise ValueError(f"`images` must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        return batches, len(batches)
    if isinstance(images, DataLoader):
        loader = images
    elif isinstance(images, Dataset):
        loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    else:
        raise TypeError(f"`images` must be a tensor, a Dataset or a DataLoader, got {type(images).__name__}")
    try:
        count = len(loader)
    except TypeError:
        count = None
    return (_image_tensor(batch) for batch in loader), count


def _image_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("images", "image", "pixel_values"):
            if key in batch:
                return batch[key]
        raise ValueError(f"a dict batch needs an 'images', 'image' or 'pixel_values' entry, got keys {list(batch)}")
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def fit_on_images(
    model: nn.Module,
    head: nn.Module,
    spec: HeadSpec,
    layout: PatchLayout | None,
    capture: Callable,
    accumulator: CurvatureAccumulator,
    images,
    scheduler,
    *,
    batch_size: int,
    timesteps_per_image: int,
    generator: torch.Generator | None,
    model_kwargs: ModelKwargs,
    progress: bool,
) -> FitStatistics:
    """Run the data loop; the model must already be in eval mode and gradients off.

    ``capture()`` records the head's input φ (on its token grid for a patch transformer);
    ``scheduler`` is a diffusers scheduler or a :class:`~bayesdiff_ext.posterior.training_noise.TrainingNoise`.
    """
    timesteps_per_image = check_count("timesteps_per_image", timesteps_per_image)
    noising = training_noise(scheduler)
    denoiser = Denoiser(model)
    batches, count = image_batches(images, check_count("batch_size", batch_size))
    stats = FitStatistics(timesteps_per_image=timesteps_per_image)
    total = None if count is None else count * timesteps_per_image
    checked = False
    shape = sample_shape(model)
    with tqdm(total=total, disable=not progress, desc="Fitting last-layer Laplace", unit="batch") as bar:
        for number, x0 in enumerate(batches):
            # the value range on the first batch only: a later small batch of bright images may be all >= 0
            check_images(x0, shape, check_range=number == 0)
            x0 = x0.to(denoiser.device, denoiser.dtype)
            kwargs = model_kwargs(x0) if callable(model_kwargs) else dict(model_kwargs or {})
            for _ in range(timesteps_per_image):
                x_t, timestep, target = noising.draw(x0, generator)
                with capture() as cap:
                    out = denoiser(x_t, timestep, kwargs)
                if cap.phi is None:
                    raise RuntimeError("the head was not called during the model's forward")
                if not checked:
                    _check_output_is_head(head, spec, layout, cap.phi, out)
                    checked = True
                dtype = accumulation_dtype(out)
                channels = spec.eps_channels if layout is None else layout.eps_channels
                residual = _eps_part(out, channels, spec).to(dtype) - _eps_part(target, channels, spec).to(dtype)
                if layout is not None:
                    residual = layout.to_tokens(residual)
                accumulator.update(cap.phi, residual)
                stats.add(residual)
                bar.update(1)
            stats.n_images += len(x0)
    if stats.n_images == 0:
        raise ValueError("`images` is empty")
    return stats


def _eps_part(output: torch.Tensor, channels: int, spec: HeadSpec) -> torch.Tensor:
    """The ε channels of a model output (or of its target): dim 1 for images, the last for tokens."""
    if spec.is_conv or output.dim() == 4:
        return output[:, :channels]
    return output[..., :channels]


def _check_output_is_head(
    head: nn.Module, spec: HeadSpec, layout: PatchLayout | None, phi: torch.Tensor, out: torch.Tensor
) -> None:
    """The posterior describes the head's output; refuse a model that post-processes it (beyond the
    unpatchify of a patch transformer, which is compared through)."""
    check_finite("the model's output", out)
    head_out = head(phi)
    if layout is not None:
        head_out = layout.to_output(head_out)
    if head_out.shape != out.shape or not torch.allclose(head_out, out, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"the model's output {tuple(out.shape)} is not the output of its head {spec.shape_text()} "
            f"({tuple(head_out.shape)}): something post-processes it, so the head posterior does not describe "
            "ε. Fit such a model with fit_features(...) on (φ, target) pairs in the head's output layout."
        )


def fit_on_features(
    head: nn.Module, spec: HeadSpec, accumulator: CurvatureAccumulator, features: Iterable, *, progress: bool
) -> FitStatistics:
    """Accumulate from precomputed (φ, target) batches; target is ε in the head's output layout."""
    stats = FitStatistics()
    device = head.weight.device
    for phi, target in tqdm(features, disable=not progress, desc="Fitting last-layer Laplace", unit="batch"):
        phi = phi.to(device)
        out = head(phi)
        f = out[:, : spec.eps_channels] if spec.is_conv else out[..., : spec.eps_channels]
        dtype = accumulation_dtype(f)
        residual = f.to(dtype) - target.to(f.device, dtype).reshape(f.shape)
        accumulator.update(phi, residual)
        stats.add(residual)
        stats.n_images += len(phi)
    if stats.n_images == 0:
        raise ValueError("`features` is empty")
    return stats

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.distributed import (
    all_reduce_sum,
    broadcast,
    failing_together,
    is_distributed,
    is_main_process,
    rank_and_world,
    shard_batches,
)
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.output_layout import PatchLayout
from bayesdiff_ext.posterior.training_noise import training_noise
from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.validation import check_count, check_finite, check_images, sample_shape

ModelKwargs = Mapping[str, Any] | Callable[[torch.Tensor], Mapping[str, Any]] | None


class CurvatureAccumulator(Protocol):
    """Sums over the data of a structure's curvature; ``sums``/``set_sums`` expose them as tensors
    whose element-wise sum over processes is the statistic of the union of their data."""

    def update(self, phi: torch.Tensor, residual: torch.Tensor) -> None: ...

    def sums(self) -> list[torch.Tensor]: ...

    def set_sums(self, sums: list[torch.Tensor]) -> None: ...


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

    def sums(self) -> torch.Tensor:
        """The counts and the residual sum of squares, float64 (counts below 2⁵³ are exact)."""
        counts = (self.n_images, self.n_samples, self.residual_elements)
        return torch.tensor([*counts, self.residual_sum_squares], dtype=torch.float64)

    def set_sums(self, sums: torch.Tensor) -> None:
        n_images, n_samples, elements, self.residual_sum_squares = sums.tolist()
        self.n_images, self.n_samples, self.residual_elements = int(n_images), int(n_samples), int(elements)


def image_batches(images, batch_size: int) -> tuple[Iterable[tuple[Sequence[int], torch.Tensor]], int | None]:
    """This process's batches of x_0, each with its images' global indices, and how many there are.

    A tensor (N, C, H, W) or a sized Dataset is cut into the batches [0, B), [B, 2B), …; in a
    process group, process r takes batches r, r + W, … (:func:`~bayesdiff_ext.distributed.shard_batches`).
    A DataLoader is read as it comes: in one process its images are numbered in the order it yields
    them; in a process group it must sample with a ``DistributedSampler``, whose indices number the
    images and whose padding (the first indices repeated to fill the last round) is dropped.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() < 2:
            raise ValueError(f"`images` must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
        batches = shard_batches(len(images), batch_size)
        return ((batch, images[batch.start : batch.stop]) for batch in batches), len(batches)
    if isinstance(images, DataLoader):
        return _loader_batches(images)
    if not isinstance(images, Dataset):
        raise TypeError(f"`images` must be a tensor, a Dataset or a DataLoader, got {type(images).__name__}")
    try:
        batches = shard_batches(len(images), batch_size)
    except TypeError:  # an iterable dataset: read in order
        return _loader_batches(DataLoader(images, batch_size=batch_size))
    loader = DataLoader(images, batch_sampler=[list(batch) for batch in batches])
    return zip(batches, map(_image_tensor, loader)), len(batches)


def _loader_batches(loader: DataLoader) -> tuple[Iterable[tuple[Sequence[int], torch.Tensor]], int | None]:
    rank, world = rank_and_world()
    try:
        count = len(loader)
    except TypeError:
        count = None
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        if (sampler.num_replicas, sampler.rank) != (world, rank):
            raise ValueError(
                f"the DataLoader's DistributedSampler is for process {sampler.rank} of {sampler.num_replicas}, "
                f"but this is process {rank} of {world}"
            )
        if not (isinstance(loader.batch_sampler, BatchSampler) and loader.batch_sampler.sampler is sampler):
            raise ValueError("a DataLoader with a DistributedSampler must batch it with its own batch_size")
        order = list(iter(sampler))
        # position k of this process is position rank + k·W of the padded list; from len(dataset) on,
        # the sampler repeats the first indices (another process has those images)
        real = len(order) if sampler.drop_last else max(0, -(-(len(sampler.dataset) - rank) // world))
        return _numbered(loader, order, real), count
    if world > 1:
        raise ValueError(
            f"in a process group of {world} processes, a DataLoader must sample with "
            "torch.utils.data.DistributedSampler (each process its own images), or pass the tensor or "
            "Dataset itself and the fit splits it"
        )
    return _numbered(loader, None, None), count


def _numbered(loader: DataLoader, order: list[int] | None, real: int | None):
    """(global indices, x_0) of each batch: ``order``'s indices up to position ``real``, or 0, 1, …"""
    position = 0
    for batch in loader:
        x0 = _image_tensor(batch)
        indices = range(position, position + len(x0)) if order is None else order[position : position + len(x0)]
        keep = len(x0) if real is None else max(0, min(len(x0), real - position))
        position += len(x0)
        if keep:
            yield indices[:keep], x0[:keep]


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


def fit_seed(generator: torch.Generator | None) -> int:
    """The fit's seed: one draw of ``generator`` (on its device; None: the global CPU generator).

    Each image's (t, ε) then come from its own stream (seed, image index) (:func:`fit_generators`),
    so the fitted posterior does not depend on the batch size.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def fit_generators(seed: int, indices: Iterable[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """The fit's generator of each image index: its (t, ε) draws, in the order the fit makes them."""
    return image_generators(seed, indices, device, "fit")


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
    batch_size = check_count("batch_size", batch_size)
    stats = FitStatistics(timesteps_per_image=timesteps_per_image)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    seed = broadcast(fit_seed(generator))  # process 0's: every image's draws follow one seed
    checked = False
    progress = progress and is_main_process()
    shape = sample_shape(model)
    with failing_together():
        batches, count = image_batches(images, batch_size)
        total = None if count is None else count * timesteps_per_image
        with tqdm(total=total, disable=not progress, desc="Fitting last-layer Laplace", unit="batch") as bar:
            for number, (indices, x0) in enumerate(batches):
                # the value range on process 0's first batch only: a later small batch of bright images may
                # be all >= 0
                check_images(x0, shape, check_range=number == 0 and is_main_process())
                x0 = x0.to(denoiser.device, denoiser.dtype)
                kwargs = model_kwargs(x0) if callable(model_kwargs) else dict(model_kwargs or {})
                streams = fit_generators(seed, indices, draw_device)
                for _ in range(timesteps_per_image):
                    x_t, timestep, target = noising.draw(x0, streams)
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
    sum_over_processes(accumulator, stats)
    if stats.n_images == 0:
        raise ValueError("`images` is empty")
    return stats


def sum_over_processes(accumulator: CurvatureAccumulator, stats: FitStatistics) -> None:
    """In a process group, replace this process's sums by those over every process (one float64
    all-reduce); the accumulator and ``stats`` then describe the union of the shards."""
    if not is_distributed():
        return
    local = accumulator.sums()
    summed = all_reduce_sum([*local, stats.sums()])
    accumulator.set_sums(summed[: len(local)])
    stats.set_sums(summed[-1])


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
    """Accumulate from precomputed (φ, target) batches; target is ε in the head's output layout. In a
    process group each process passes its own features and the sums are combined."""
    stats = FitStatistics()
    device = head.weight.device
    progress = progress and is_main_process()
    with failing_together():
        for phi, target in tqdm(features, disable=not progress, desc="Fitting last-layer Laplace", unit="batch"):
            phi = phi.to(device)
            out = head(phi)
            f = out[:, : spec.eps_channels] if spec.is_conv else out[..., : spec.eps_channels]
            dtype = accumulation_dtype(f)
            residual = f.to(dtype) - target.to(f.device, dtype).reshape(f.shape)
            accumulator.update(phi, residual)
            stats.add(residual)
            stats.n_images += len(phi)
    sum_over_processes(accumulator, stats)
    if stats.n_images == 0:
        raise ValueError("`features` is empty")
    return stats

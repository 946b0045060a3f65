"""Writing a run's results to disk, all at once or not at all.

Layout of an output folder (``bayesdiff-out/<timestamp>/`` by default)::

    samples/00000.png ...      the images, model scale [-1, 1] mapped to 8 bit
    uncertainty/00000.png ...  Var[x_0] averaged over channels, 'inferno', one shared linear scale
                               from 0 to the run's 99th percentile (brighter pixels saturate)
    kept/00000.png ...         the samples the filter kept (same names as in samples/)
    grid_sorted.png            samples beside their maps, sorted by score, scores printed
    scores.csv                 index, one column per aggregation, kept (1/0)
    summary.json               scores, filter decision, colour scale, settings, versions, timings
    tensors.safetensors        the native-resolution float tensors (images, variance, mean, scores;
                               a pipeline run also latent_mean, latent_variance)

With the variance split (``RunRecord.aleatoric_variance``) also ``uncertainty_aleatoric/`` and
``uncertainty_epistemic/`` (the two parts of Var[x_0], on the same colour scale as
``uncertainty/``), the columns ``aleatoric_sum`` and ``epistemic_sum`` in scores.csv, a
``variance_split`` entry in summary.json and both maps in tensors.safetensors.

PNGs of small images are enlarged by an integer nearest-neighbour factor (see
:mod:`bayesdiff_ext.io.images`); ``tensors.safetensors`` keeps the exact values.

Everything is written into a hidden sibling folder that is renamed into place at the end, so a
run that fails part-way leaves no output folder behind; each file inside is itself written to a
temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from bayesdiff_ext import aggregation
from bayesdiff_ext._version import library_versions
from bayesdiff_ext.aggregation import FilterDecision
from bayesdiff_ext.io.atomic import atomic_directory, atomic_write
from bayesdiff_ext.io.grid import sorted_grid
from bayesdiff_ext.io.images import colorize, display_factor, encode_png, to_uint8, upscale
from bayesdiff_ext.numerics import per_image_sum

__all__ = [
    "DISPLAY_PERCENTILE",
    "RunRecord",
    "check_output_dir",
    "timestamped_out_dir",
    "write_run",
]

#: The uncertainty maps' colour scale ends at this percentile of all map pixels of a run. Per-pixel
#: variances are heavy-tailed (in the bundled demo the median is ~1/200 of the maximum), so a scale
#: up to the maximum would paint nearly every map black; the few brighter pixels saturate instead.
DISPLAY_PERCENTILE = 99.0
#: The latent moments a pipeline run keeps beside the pixel maps.
LATENT_MOMENTS = ("latent_mean", "latent_variance")


@dataclass
class RunRecord:
    """What a sampling run produced and how: the input of :func:`write_run`.

    ``scores`` maps each aggregation's name to its per-image scores (B,), ``aggregations`` the same
    names to the parameters used; ``primary`` names the score that was filtered on and sorts the
    grid; ``decision`` is the filter's result on it. ``aleatoric_variance`` (optional) is the part
    of ``variance`` from the sampler's own noise; the rest is epistemic. ``clamped_pixels`` (optional,
    (B,)) counts the elements whose estimate was clamped to 0. ``latent_moments`` (a latent pipeline's
    run): ``latent_mean`` and ``latent_variance``, E and Var of z_0 in the pipeline's latent layout,
    from which the pixel ``mean`` and ``variance`` were decoded.
    """

    images: torch.Tensor
    variance: torch.Tensor
    scores: Mapping[str, torch.Tensor]
    aggregations: Mapping[str, Mapping]
    primary: str
    decision: FilterDecision
    settings: Mapping = field(default_factory=dict)
    timings: Mapping = field(default_factory=dict)
    mean: torch.Tensor | None = None
    aleatoric_variance: torch.Tensor | None = None
    clamped_pixels: torch.Tensor | None = None
    latent_moments: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def variance_split(self) -> dict[str, torch.Tensor]:
        """``{'aleatoric': ..., 'epistemic': ...}`` maps, or {} without a split."""
        if self.aleatoric_variance is None:
            return {}
        aleatoric = torch.minimum(self.aleatoric_variance.clamp_min(0), self.variance)
        return {"aleatoric": aleatoric, "epistemic": self.variance - aleatoric}

    def check(self) -> None:
        """Raise ValueError if the parts do not describe the same batch of images."""
        shape = tuple(self.images.shape)
        if self.images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {shape}")
        for name, t in (
            ("variance", self.variance),
            ("mean", self.mean),
            ("aleatoric_variance", self.aleatoric_variance),
        ):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but images have shape {shape}")
        batch = shape[0]
        for name, t in self.latent_moments.items():
            if name not in LATENT_MOMENTS or t.shape[0] != batch:
                raise ValueError(f"latent_moments[{name!r}] must be one of {LATENT_MOMENTS} with {batch} rows")
        for name, s in self.scores.items():
            if tuple(s.shape) != (batch,):
                raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}, expected ({batch},)")
        if self.primary not in self.scores:
            raise ValueError(f"primary score {self.primary!r} is not among the scores {list(self.scores)}")
        if tuple(self.decision.keep.shape) != (batch,):
            raise ValueError(f"the filter decision covers {self.decision.keep.numel()} images, not {batch}")


def timestamped_out_dir(root: str | os.PathLike = "bayesdiff-out") -> Path:
    """``root/<YYYYmmdd-HHMMSS>``, with a ``-2``, ``-3`` ... suffix if that folder already exists."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check, without creating anything, that ``path`` can become a new output folder.

    It may not exist yet (its parents are created) or be an empty folder. Raises
    FileExistsError / NotADirectoryError / PermissionError with a message naming the path; returns
    the absolute path. Meant to be called before a long run, so it fails fast.
    """
    out = Path(path).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"output path {out} exists and is not a folder")
        if any(out.iterdir()):
            raise FileExistsError(f"output folder {out} already exists and is not empty; choose a new one")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create output folder {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create output folder {out}: {ancestor} is not writable")
    return out


def _scores_csv(record: RunRecord) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    split = {f"{part}_sum": per_image_sum(v) for part, v in record.variance_split().items()}
    names = list(record.scores) + list(split)
    writer.writerow(["index", *names, "kept"])
    columns = [{**record.scores, **split}[name].tolist() for name in names]
    for i, kept in enumerate(record.decision.keep.tolist()):
        writer.writerow([i, *(repr(float(col[i])) for col in columns), int(kept)])
    return text.getvalue().encode()


def _summary(record: RunRecord, maps: torch.Tensor, vmax: float, factor: int, timings: Mapping) -> dict:
    batch, channels, height, width = record.images.shape
    decision = record.decision.to_dict()
    return {
        "num_images": batch,
        "image_shape": [channels, height, width],
        "primary_aggregation": record.primary,
        "aggregations": {name: dict(params) for name, params in record.aggregations.items()},
        "scores": {name: s.tolist() for name, s in record.scores.items()},
        "per_channel_sum": aggregation.per_channel(record.variance, "sum").tolist(),
        "filter": {
            **decision,
            "num_kept": len(decision["kept"]),
            "num_removed": len(decision["removed"]),
            "applied_to": record.primary,
        },
        "uncertainty_maps": {
            "quantity": "per-pixel Var[x_0], averaged over channels",
            "colormap": "inferno",
            "scale": f"linear, shared by every map of this run, from 0 to the {DISPLAY_PERCENTILE:g}th "
            "percentile of all map pixels; larger values saturate",
            "vmin": 0.0,
            "vmax": vmax,
            "max": float(maps.max()),
        },
        "png": {
            "samples": "model scale [-1, 1] mapped linearly to 0..255, values outside clipped",
            "upscale_factor": factor,
            "interpolation": "nearest",
            "native_size": [height, width],
            "exact_values": "tensors.safetensors",
        },
        **_split_summary(record),
        **_clamped_summary(record),
        **_latent_summary(record),
        "settings": dict(record.settings),
        "versions": library_versions(),
        "timings": dict(timings),
    }


def _clamped_summary(record: RunRecord) -> dict:
    if record.clamped_pixels is None:
        return {}
    per_image = [int(n) for n in record.clamped_pixels]
    return {
        "clamped_pixels": {
            "description": "elements whose variance estimate came out <= 0 and were set to 0: an exact zero "
            "there means 'clamped', not 'certain' (the moment recurrence can produce them; trajectory "
            "estimators never do)",
            "total": sum(per_image),
            "per_image": per_image,
        }
    }


def _latent_summary(record: RunRecord) -> dict:
    if not record.latent_moments:
        return {}
    return {
        "latent_moments": {
            "description": "E[z_0] and Var[z_0] in the pipeline's latent layout (model scale; Flux: packed "
            "tokens), from which the pixel mean and variance were decoded; in tensors.safetensors",
            **{name: list(t.shape) for name, t in record.latent_moments.items()},
        }
    }


def _split_summary(record: RunRecord) -> dict:
    split = record.variance_split()
    if not split:
        return {}
    return {
        "variance_split": {
            "description": "Var[x_0] = aleatoric (the sampler's own noise) + epistemic (the model's "
            "uncertainty), law of total variance; per-image sums",
            **{f"{part}_sum": per_image_sum(v).tolist() for part, v in split.items()},
        }
    }


def _write_contents(folder: Path, record: RunRecord) -> None:
    from safetensors.torch import save

    started = time.perf_counter()
    samples = to_uint8(record.images)
    maps = record.variance.detach().to("cpu", torch.float64).mean(dim=1)
    vmax = float(np.percentile(maps.numpy(), DISPLAY_PERCENTILE))
    if vmax <= 0:  # more than 99% of the pixels are certain: fall back to the maximum
        vmax = float(maps.max())
    heatmaps = colorize(maps, vmax)
    factor = display_factor(*samples.shape[1:3])
    for sub in ("samples", "uncertainty", "kept"):
        (folder / sub).mkdir()
    keep = record.decision.keep.tolist()
    for i in range(samples.shape[0]):
        name = f"{i:05d}.png"
        png = encode_png(upscale(samples[i], factor))
        atomic_write(folder / "samples" / name, png)
        if keep[i]:
            atomic_write(folder / "kept" / name, png)
        atomic_write(folder / "uncertainty" / name, encode_png(upscale(heatmaps[i], factor)))
    for part, part_variance in record.variance_split().items():
        sub = folder / f"uncertainty_{part}"
        sub.mkdir()
        part_maps = colorize(part_variance.detach().to("cpu", torch.float64).mean(dim=1), vmax)
        for i in range(samples.shape[0]):
            atomic_write(sub / f"{i:05d}.png", encode_png(upscale(part_maps[i], factor)))
    grid = sorted_grid(
        upscale(samples, factor),
        upscale(heatmaps, factor),
        record.scores[record.primary].cpu().numpy(),
        record.decision.keep.numpy(),
        score_name=record.primary,
        rule=record.decision.rule,
        vmax=vmax,
    )
    atomic_write(folder / "grid_sorted.png", encode_png(grid))
    atomic_write(folder / "scores.csv", _scores_csv(record))
    # Copies: safetensors refuses tensors that share memory (a sampler may return one tensor as
    # both the image and the mean).
    tensors = {"images": record.images, "variance": record.variance}
    if record.mean is not None:
        tensors["mean"] = record.mean
    tensors.update({f"{part}_variance": v for part, v in record.variance_split().items()})
    tensors.update(record.latent_moments)
    tensors.update({f"scores.{name}": s for name, s in record.scores.items()})
    atomic_write(
        folder / "tensors.safetensors",
        save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}),
    )
    timings = {**record.timings, "write_s": time.perf_counter() - started}
    summary = json.dumps(_summary(record, maps, vmax, factor, timings), indent=2, default=str)
    atomic_write(folder / "summary.json", summary.encode())


def write_run(out_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write ``record`` as a complete output folder at ``out_dir`` and return its absolute path.

    The folder appears only once everything in it has been written (:func:`~bayesdiff_ext.io.atomic.atomic_directory`):
    contents go to a hidden sibling folder that is renamed to ``out_dir`` at the end and removed
    if anything fails (the error is re-raised).
    """
    record.check()
    out = check_output_dir(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create output folder {out}: {err.strerror or err}") from err
    with atomic_directory(out) as staging:
        _write_contents(staging, record)
    return out

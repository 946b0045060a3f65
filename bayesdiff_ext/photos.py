"""The bundled photo-crops model: RGB data from scikit-learn's sample photos, and its loaders.

A second bundled model, unlike digits: colour textures instead of grey strokes. The data are
random 16x16 crops of scikit-learn's two sample photos (``load_sample_images``: ``china.jpg``, a
pagoda among trees, and ``flower.jpg``, a dahlia on a blurred background; 427x640 RGB each, shipped
inside scikit-learn, no download), each photo first shrunk by ``DOWNSCALE`` so that a crop holds a
recognisable piece of the scene. A crop's class is the photo and the quadrant of that photo its
centre lies in (8 classes): the bundled classifier learns where a crop comes from, and its
confidence and penultimate features serve the evaluation as they do for digits. The bundled
assets in ``bayesdiff_ext/assets/photos`` are

* ``unet/``, ``scheduler/``: a small ``diffusers.UNet2DModel`` (3 channels, epsilon prediction,
  head ``conv_out``) and its ``DDPMScheduler`` config,
* ``classifier.safetensors`` + ``classifier_config.json``: a
  :class:`~bayesdiff_ext.digits.DigitsClassifier` with 3 input channels and 8 classes,
* ``posterior_diag.safetensors``: the fitted diag posterior of ``conv_out``,
* ``MODEL_CARD.md``, ``training_log.json``: how they were made (``python/train_photos.py``).

Like :mod:`bayesdiff_ext.digits`, this module works offline and needs no compiled extension.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DOWNSCALE",
    "GRID",
    "NUM_CLASSES",
    "bundled_dir",
    "load_bundled_classifier",
    "load_bundled_scheduler",
    "load_bundled_unet",
    "load_photo_crops",
    "load_photos",
    "random_crops",
]

#: Each photo is shrunk by this factor (427x640 -> 107x160) before cropping.
DOWNSCALE = 4
#: Quadrants per photo (rows, columns) that make the classes.
GRID = (2, 2)
NUM_CLASSES = 2 * GRID[0] * GRID[1]
#: The regeneration command (from the repository root).
REGENERATE_COMMAND = "python python/train_photos.py --out bayesdiff_ext/assets/photos"


def load_photos() -> list[torch.Tensor]:
    """scikit-learn's two sample photos, each (3, H, W) float32 in [-1, 1], shrunk by ``DOWNSCALE``
    (antialiased bilinear resampling, a weighted mean of the pixels, so the range stays in [-1, 1])."""
    from sklearn.datasets import load_sample_images

    photos = []
    for array in load_sample_images().images:
        x = torch.from_numpy(np.asarray(array, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
        size = (round(x.shape[-2] / DOWNSCALE), round(x.shape[-1] / DOWNSCALE))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        photos.append(x[0].clamp_(-1.0, 1.0).contiguous())
    return photos


def random_crops(
    photos: list[torch.Tensor], count: int, resolution: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` crops (count, 3, R, R) at uniformly random photos and positions, with their classes
    (count,) int64: ``photo · GRID[0]·GRID[1] + quadrant`` of the crop's centre."""
    if resolution < 1 or any(resolution > min(p.shape[-2:]) for p in photos):
        raise ValueError(f"resolution must be in [1, {min(min(p.shape[-2:]) for p in photos)}], got {resolution}")
    rows, cols = GRID
    which = torch.randint(0, len(photos), (count,), generator=generator)
    crops = torch.empty(count, 3, resolution, resolution)
    labels = torch.empty(count, dtype=torch.int64)
    for i, k in enumerate(which.tolist()):
        height, width = photos[k].shape[-2:]
        top = int(torch.randint(0, height - resolution + 1, (), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (), generator=generator))
        crops[i] = photos[k][:, top : top + resolution, left : left + resolution]
        row = min(rows - 1, (top + resolution // 2) * rows // height)
        col = min(cols - 1, (left + resolution // 2) * cols // width)
        labels[i] = k * rows * cols + row * cols + col
    return crops, labels


def load_photo_crops(
    num_images: int = 2000, resolution: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of crops (``num_images``, 3, R, R) in [-1, 1] and their classes, from ``seed``:
    the model's data set for fitting posteriors and for the evaluation's real images."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return random_crops(load_photos(), num_images, resolution, torch.Generator().manual_seed(seed))


def bundled_dir() -> Path:
    """Path of the bundled assets folder ``bayesdiff_ext/assets/photos``."""
    return Path(__file__).resolve().parent / "assets" / "photos"


def _bundled(load):
    """``load()``, with a missing file reported as this model's (the loaders are digits')."""
    try:
        return load()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the bundled photo-crops model in {bundled_dir()} is incomplete ({err}); regenerate it with "
            f"`{REGENERATE_COMMAND}` (run from the repository root)"
        ) from None


def load_bundled_unet(device="cpu", dtype: torch.dtype = torch.float32):
    """The bundled ``UNet2DModel`` (offline, eval mode)."""
    from bayesdiff_ext import digits

    return _bundled(lambda: digits.load_bundled_unet(root=bundled_dir(), device=device, dtype=dtype))


def load_bundled_scheduler():
    """The bundled ``DDPMScheduler`` (offline)."""
    from bayesdiff_ext import digits

    return _bundled(lambda: digits.load_bundled_scheduler(root=bundled_dir()))


def load_bundled_classifier(device="cpu"):
    """The bundled crop classifier (a 3-channel, 8-class ``DigitsClassifier``; eval mode, frozen)."""
    from bayesdiff_ext import digits

    return _bundled(lambda: digits.load_bundled_classifier(root=bundled_dir(), device=device))

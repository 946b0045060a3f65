"""Turning model-scale images and variance maps into 8-bit pictures and PNG bytes.

Tiny images (the bundled digits are 16x16) are enlarged by an integer nearest-neighbour factor to
at least :data:`DISPLAY_SIZE` pixels, so every native pixel becomes an exact k×k block: the file is
viewable and the native values can still be read back by taking every k-th pixel.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DISPLAY_SIZE",
    "INFERNO_ANCHORS",
    "colorize",
    "display_factor",
    "encode_png",
    "to_uint8",
    "upscale",
]

#: The smallest side, in pixels, that written images are enlarged to.
DISPLAY_SIZE = 64

#: matplotlib's 'inferno' colour map sampled at 33 evenly spaced points (0 -> black, 1 -> pale
#: yellow); linear interpolation between them stays within 5/255 of the 256-entry original.
#: Stored here because matplotlib is not a runtime dependency.
INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (4, 3, 18),
        (11, 7, 36),
        (21, 11, 55),
        (33, 12, 74),
        (47, 10, 91),
        (61, 9, 101),
        (74, 12, 107),
        (87, 16, 110),
        (100, 21, 110),
        (113, 25, 110),
        (125, 30, 109),
        (138, 34, 106),
        (151, 39, 102),
        (163, 44, 97),
        (176, 49, 91),
        (188, 55, 84),
        (199, 62, 76),
        (210, 70, 68),
        (219, 80, 59),
        (228, 90, 49),
        (235, 102, 40),
        (241, 115, 29),
        (246, 128, 19),
        (249, 142, 9),
        (251, 157, 7),
        (252, 172, 17),
        (251, 188, 33),
        (249, 203, 53),
        (245, 219, 76),
        (242, 234, 105),
        (243, 246, 138),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def display_factor(height: int, width: int) -> int:
    """The integer nearest-neighbour enlargement that brings the larger side to DISPLAY_SIZE."""
    return max(1, -(-DISPLAY_SIZE // max(height, width)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-scale images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C); values outside are clipped.

    Only C = 1 (grey) and C = 3 (RGB) have a faithful picture; anything else raises ValueError.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape (B, C, H, W) with C = 1 (grey) or 3 (RGB) to be written as PNG, "
            f"got {tuple(images.shape)}"
        )
    x = ((images.detach().to("cpu", torch.float64) + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def colorize(maps: torch.Tensor, vmax: float) -> np.ndarray:
    """Maps (B, H, W) -> uint8 RGB (B, H, W, 3) through 'inferno' on the linear scale [0, vmax].

    Every map shares the one scale, so equal colours mean equal variance across the run. Values
    above vmax saturate; vmax <= 0 (a run with no variance at all) paints everything in the bottom colour.
    """
    m = maps.detach().to("cpu", torch.float64).numpy()
    t = np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(m)
    grid = np.linspace(0.0, 1.0, len(INFERNO_ANCHORS))
    rgb = np.stack([np.interp(t, grid, INFERNO_ANCHORS[:, i]) for i in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (..., H, W, C) pixels by an integer factor."""
    return pixels.repeat(factor, axis=-3).repeat(factor, axis=-2)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (H, W, 1) grey or (H, W, 3) RGB uint8 pixels."""
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()

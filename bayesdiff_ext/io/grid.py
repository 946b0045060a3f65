"""One picture of a whole run: every sample beside its uncertainty map, sorted by score."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bayesdiff_ext.io.images import INFERNO_ANCHORS

__all__ = ["sorted_grid"]

_PAD = 4  # pixels between and around cells
_FRAME = 2  # width of the frame that marks a removed image
_BACKGROUND = (255, 255, 255)
_REMOVED = (220, 30, 30)
_TEXT = (0, 0, 0)


def _colour_bar(width: int, height: int) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, width)
    grid = np.linspace(0.0, 1.0, len(INFERNO_ANCHORS))
    row = np.stack([np.interp(ramp, grid, INFERNO_ANCHORS[:, i]) for i in range(3)], axis=-1)
    return Image.fromarray(np.repeat(row[None].round().astype(np.uint8), height, axis=0))


def sorted_grid(
    samples: np.ndarray,
    heatmaps: np.ndarray,
    scores: np.ndarray,
    keep: np.ndarray,
    *,
    score_name: str,
    rule: str,
    vmax: float,
) -> np.ndarray:
    """RGB uint8 grid (H, W, 3) of ``samples`` (B, h, w, 1|3) next to ``heatmaps`` (B, h, w, 3).

    Cells run left to right, top to bottom from the lowest score (most certain) to the highest;
    each is labelled with the image's index and score, and images the filter removed get a red
    frame. A title states the ordering and the colour scale, and a colour bar spans [0, vmax].
    """
    count, h, w = samples.shape[:3]
    order = np.argsort(scores, kind="stable")
    font = ImageFont.load_default()
    text_h = font.getbbox("#0 0.0e+00")[3] + 2
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / cols)
    cell_w = 2 * w + _PAD + 2 * _FRAME
    cell_h = h + 2 * _FRAME + text_h
    title = [
        f"{count} samples sorted by '{score_name}' score, lowest (most certain) first; "
        f"each cell: sample | variance map",
        f"red frame: removed by the '{rule}' filter ({int((~keep).sum())} of {count})",
    ]
    title_w = max(int(font.getlength(line)) for line in title)
    bar_w = max(64, min(256, cols * cell_w))
    width = max(cols * (cell_w + _PAD) + _PAD, title_w + 2 * _PAD, bar_w + 2 * _PAD)
    top = _PAD + len(title) * text_h + _PAD
    bar_top = top + rows * (cell_h + _PAD)
    height = bar_top + 12 + text_h + _PAD

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title):
        draw.text((_PAD, _PAD + i * text_h), line, fill=_TEXT, font=font)
    for slot, index in enumerate(order):
        x = _PAD + (slot % cols) * (cell_w + _PAD)
        y = top + (slot // cols) * (cell_h + _PAD)
        if not keep[index]:
            draw.rectangle([x, y, x + cell_w - 1, y + h + 2 * _FRAME - 1], fill=_REMOVED)
        sample = samples[index]
        sample = np.repeat(sample, 3, axis=-1) if sample.shape[-1] == 1 else sample
        canvas.paste(Image.fromarray(sample), (x + _FRAME, y + _FRAME))
        canvas.paste(Image.fromarray(heatmaps[index]), (x + _FRAME + w + _PAD, y + _FRAME))
        draw.text((x, y + h + 2 * _FRAME), f"#{index} {scores[index]:.3g}", fill=_TEXT, font=font)
    canvas.paste(_colour_bar(bar_w, 12), (_PAD, bar_top))
    draw.text((_PAD, bar_top + 12), "0", fill=_TEXT, font=font)
    label = f"{vmax:.3g} and above (variance, linear)"
    draw.text((_PAD + bar_w - int(font.getlength(label)), bar_top + 12), label, fill=_TEXT, font=font)
    return np.asarray(canvas)

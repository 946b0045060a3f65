"""The bundled digits model: data, a small classifier and loaders for the bundled weights.

Everything here works offline. The data is scikit-learn's ``load_digits`` (1,797 grey 8x8
images that ship inside scikit-learn), scaled to [-1, 1] and upsampled to 16x16. The bundled
assets in ``bayesdiff_ext/assets/digits`` are

* ``unet/``                 a small ``diffusers.UNet2DModel`` (epsilon prediction, head ``conv_out``),
* ``scheduler/``            its ``DDPMScheduler`` config,
* ``classifier.safetensors`` + ``classifier_config.json``  a :class:`DigitsClassifier`, used as the
  quality oracle and as the default FID / CMMD feature extractor for the bundled model,
* ``MODEL_CARD.md``, ``training_log.json``  how they were made.

Optional variants (``unet_dropout/`` for MC dropout, ``ensemble/member_K/unet`` for deep
ensembles) are produced by ``python/train_digits.py`` and loaded with the same functions.

This module does not import the compiled extension; it only needs torch, numpy, scikit-learn,
diffusers and safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "load_digits_images",
    "DigitsClassifier",
    "bundled_dir",
    "load_bundled_unet",
    "load_bundled_scheduler",
    "load_bundled_classifier",
    "REGENERATE_COMMAND",
]

#: The command that regenerates the bundled assets (run from the repository root).
REGENERATE_COMMAND = "python python/train_digits.py --out bayesdiff_ext/assets/digits"

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def load_digits_images(
    resolution: int = 16, device: Union[str, torch.device] = "cpu"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as a float32 tensor (N, 1, R, R) in [-1, 1] and labels (N,) int64.

    The 8x8 values 0..16 are mapped linearly to [-1, 1] (0 -> -1, 16 -> 1) and upsampled to
    ``resolution`` with bilinear interpolation (``align_corners=False``). Bilinear interpolation
    is a convex combination, so the range stays inside [-1, 1].
    """
    from sklearn.datasets import load_digits

    resolution = int(resolution)
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    ds = load_digits()
    x = torch.from_numpy(np.asarray(ds.images, dtype=np.float32)).unsqueeze(1)  # (N,1,8,8)
    x = x / 8.0 - 1.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp_(-1.0, 1.0).contiguous()
    y = torch.from_numpy(np.asarray(ds.target, dtype=np.int64))
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------
# classifier / feature extractor
# --------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN for 1xRxR digits in [-1, 1].

    ``forward(x)`` returns logits (N, 10); ``features(x)`` returns the penultimate embedding
    (N, ``feature_dim``) — the default FID / CMMD feature extractor for the bundled model.
    There is no batch norm and no dropout, so the output depends only on the weights (the
    module behaves the same in train and eval mode).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
    ):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.config = {
            "channels": [c1, c2],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "in_channels": int(in_channels),
        }
        self.conv1a = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv1b = nn.Conv2d(c1, c1, 3, padding=1)
        self.conv2a = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv2b = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N, feature_dim), after the ReLU of the first linear layer."""
        if x.dim() != 4:
            raise ValueError(f"expected (N, C, H, W) input, got shape {tuple(x.shape)}")
        h = F.relu(self.conv1a(x))
        h = F.relu(self.conv1b(h))
        h = F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 8 else h
        h = F.relu(self.conv2a(h))
        h = F.relu(self.conv2b(h))
        h = F.adaptive_avg_pool2d(h, 4)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


# --------------------------------------------------------------------------------------------
# bundled assets
# --------------------------------------------------------------------------------------------
def bundled_dir() -> Path:
    """Path of the bundled assets folder ``bayesdiff_ext/assets/digits``.

    Located next to this file (source checkouts and ordinary installs); falls back to
    ``importlib.resources`` for layouts where ``__file__`` does not point at the package folder.
    """
    here = Path(__file__).resolve().parent / "assets" / "digits"
    if here.exists() or not __package__:
        return here
    try:  # pragma: no cover - only for unusual install layouts
        from importlib.resources import files

        p = Path(str(files(__package__) / "assets" / "digits"))
        if p.exists():
            return p
    except Exception:  # pragma: no cover
        pass
    return here


def _missing(path: Path, what: str, extra: str = "") -> FileNotFoundError:
    return FileNotFoundError(
        f"bundled digits {what} not found at {path}. Regenerate it with "
        f"`{REGENERATE_COMMAND}{extra}` (run from the repository root)."
    )


def _resolve(root: Optional[PathLike]) -> Path:
    return Path(root) if root is not None else bundled_dir()


def load_bundled_unet(
    dropout: bool = False,
    ensemble_member: Optional[int] = None,
    root: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load the bundled ``UNet2DModel`` (offline) in eval mode.

    ``dropout=True`` loads the MC-dropout variant from ``unet_dropout/``;
    ``ensemble_member=K`` loads ``ensemble/member_K/unet``. ``root`` overrides the assets folder.
    """
    from diffusers import UNet2DModel

    base = _resolve(root)
    if dropout and ensemble_member is not None:
        raise ValueError("choose either dropout=True or ensemble_member, not both")
    if dropout:
        path, extra = base / "unet_dropout", " --unet-only --dropout 0.1"
    elif ensemble_member is not None:
        k = int(ensemble_member)
        path, extra = base / "ensemble" / f"member_{k}" / "unet", f" --unet-only --ensemble-member {k}"
    else:
        path, extra = base / "unet", " --unet-only"
    if not (path / "config.json").is_file():
        raise _missing(path, "UNet", extra)
    # Plain loading: builds float32 parameters (float16 files are upcast) and needs no `accelerate`.
    unet = UNet2DModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    unet = unet.to(device=device)
    if dtype != next(unet.parameters()).dtype:  # diffusers warns on every dtype-carrying `to()`
        unet = unet.to(dtype=dtype)
    return unet.eval()


def load_bundled_scheduler(root: Optional[PathLike] = None):
    """Load the bundled ``DDPMScheduler`` (offline). Use ``DDIMScheduler.from_config(s.config)``
    for DDIM sampling."""
    from diffusers import DDPMScheduler

    path = _resolve(root) / "scheduler"
    if not (path / "scheduler_config.json").is_file():
        raise _missing(path, "scheduler", " --unet-only")
    return DDPMScheduler.from_pretrained(str(path), local_files_only=True)


def load_bundled_classifier(
    root: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"
) -> DigitsClassifier:
    """Load the bundled :class:`DigitsClassifier` (eval mode, parameters frozen)."""
    from safetensors.torch import load_file

    base = _resolve(root)
    wpath = base / "classifier.safetensors"
    cpath = base / "classifier_config.json"
    if not wpath.is_file():
        raise _missing(wpath, "classifier", " --classifier-only")
    cfg = {}
    if cpath.is_file():
        cfg = json.loads(cpath.read_text())
    model = DigitsClassifier(
        channels=cfg.get("channels", (32, 64)),
        feature_dim=cfg.get("feature_dim", 128),
        num_classes=cfg.get("num_classes", 10),
        in_channels=cfg.get("in_channels", 1),
    )
    model.load_state_dict(load_file(str(wpath)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()

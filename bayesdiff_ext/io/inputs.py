"""Reading what a user points the command line at: a local diffusers model and fitting images.

Everything is local: models load with ``local_files_only=True`` and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bayesdiff_ext.validation import pixels_to_model_scale

__all__ = ["IMAGE_SUFFIXES", "load_images", "load_model"]

#: The stem of a diffusers model's weights files (.safetensors, .bin, and their shards).
WEIGHTS_NAME = "diffusion_pytorch_model"

#: File endings read as images from a data folder (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _config(config_path: Path) -> dict:
    try:
        return json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_path}: {err}") from err


def load_model(model_dir: str | os.PathLike, scheduler_dir: str | os.PathLike | None = None):
    """Load ``(unet, scheduler)`` from a local diffusers folder, offline; the UNet in eval mode.

    ``model_dir`` is either a pipeline folder with ``unet/`` and ``scheduler/`` subfolders (what
    ``pipeline.save_pretrained`` writes), or a bare UNet folder (``config.json`` + weights), which
    needs ``scheduler_dir`` (a folder with ``scheduler_config.json``). ``scheduler_dir`` also
    overrides a pipeline's own scheduler. Only unconditional ``UNet2DModel``s are accepted: a
    text- or class-conditioned UNet needs conditioning inputs that a folder does not provide.
    """
    import diffusers

    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"model folder {root} does not exist"
            if not root.exists()
            else f"model path {root} is not a folder"
        )
    if (root / "unet" / "config.json").is_file():
        unet_dir, default_scheduler = root / "unet", root / "scheduler"
    elif (root / "config.json").is_file():
        unet_dir, default_scheduler = root, None
    else:
        raise FileNotFoundError(
            f"{root} is not a diffusers model folder: expected unet/config.json (a pipeline folder) "
            f"or config.json (a bare UNet folder)"
        )
    sched_dir = Path(scheduler_dir).expanduser() if scheduler_dir is not None else default_scheduler
    if sched_dir is None:
        raise FileNotFoundError(
            f"{root} is a bare UNet folder; name its scheduler folder with --scheduler DIR"
        )
    if not (sched_dir / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"no scheduler_config.json in {sched_dir}")

    config = _config(unet_dir / "config.json")
    unet_class = config.get("_class_name") or "model of unknown class"
    if unet_class != "UNet2DModel":
        raise ValueError(
            f"{unet_dir} holds a {unet_class}; the command line takes unconditional UNet2DModel "
            "models (sample conditioned models from Python)"
        )
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ValueError(
            f"{unet_dir} is a class-conditioned UNet2DModel; the command line takes unconditional "
            "models (sample conditioned models from Python)"
        )
    scheduler_class = _config(sched_dir / "scheduler_config.json").get("_class_name", "")
    if not scheduler_class.endswith("Scheduler") or not hasattr(diffusers, scheduler_class):
        raise ValueError(f"{sched_dir} holds an unknown scheduler class {scheduler_class!r}")
    if not any(unet_dir.glob(f"{WEIGHTS_NAME}*")):
        raise FileNotFoundError(
            f"{unet_dir} has a config.json but no weights ({WEIGHTS_NAME}.safetensors): save the model with "
            "save_pretrained, or copy its weights file there"
        )
    # Plain loading: builds float32 parameters (float16 files are upcast) and needs no `accelerate`.
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(str(sched_dir), local_files_only=True)
    return unet.eval(), scheduler


def _from_folder(folder: Path, size: int, channels: int) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images in {folder}")
    mode = "L" if channels == 1 else "RGB"
    pixels = []
    for path in files:
        with Image.open(path) as picture:
            picture = picture.convert(mode)
            if picture.size != (size, size):
                picture = picture.resize((size, size), Image.Resampling.BICUBIC)
            pixels.append(np.asarray(picture, dtype=np.uint8).reshape(size, size, channels))
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def _from_tensor_file(path: Path) -> torch.Tensor:
    """One tensor from a .npy or .pt file; neither loader runs code from the file (no unpickling)."""
    try:
        if path.suffix.lower() == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read {path} as a plain tensor file ({reason}); save one tensor with torch.save(tensor, path) "
            "or numpy.save(path, array)"
        ) from None
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a single tensor")
    return data.unsqueeze(1) if data.dim() == 3 else data


def load_images(path: str | os.PathLike, size: int, channels: int) -> torch.Tensor:
    """Fitting images as a float32 tensor (N, channels, size, size) at model scale [-1, 1].

    ``path`` is a folder of PNG/JPG files (read in name order, converted to grey or RGB and
    resized to size×size with bicubic interpolation), or a ``.npy`` / ``.pt`` file holding one
    tensor (N, C, H, W) or (N, H, W) that must already have the model's size. Integer data is
    taken as 0..255 and mapped to [-1, 1]; floating-point data must already be in [-1, 1]
    (:func:`bayesdiff_ext.validation.pixels_to_model_scale`).
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"data path {source} does not exist")
    if source.is_dir():
        data = _from_folder(source, size, channels)
    elif source.suffix.lower() in (".npy", ".pt", ".pth"):
        data = _from_tensor_file(source)
    else:
        raise ValueError(
            f"cannot read images from {source}: expected a folder of PNG/JPG files, a .npy or a .pt file"
        )
    expected = (channels, size, size)
    if data.dim() != 4 or tuple(data.shape[1:]) != expected or data.shape[0] == 0:
        raise ValueError(
            f"images from {source} have shape {tuple(data.shape)}; the model needs (N, {channels}, "
            f"{size}, {size}) with N >= 1"
        )
    return pixels_to_model_scale(data, name=f"images from {source}")

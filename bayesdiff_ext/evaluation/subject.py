"""What an evaluation run evaluates: the model, its real images, feature spaces and quality oracles.

``load_subject(config)`` builds it for a bundled model (``builtin:digits``, ``builtin:photos``) or a
user's model folder with ``data``. The first extractor is the primary feature space (every metric,
and the k-NN realism oracle); the others get FID and CMMD only, as sanity checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["ENSEMBLE_MEMBERS", "Subject", "load_subject"]

ENSEMBLE_MEMBERS = 3


@dataclass
class Subject:
    """The model under evaluation and what it is judged against.

    * ``name``: a short key (``digits``, ``photos``, or the folder's name): the report section and
      the figures' folder; ``description``: how the report names the model.
    * ``unet``, ``scheduler``: the model and its DDIM scheduler (η = 0, no clipping).
    * ``real`` (M, C, H, W) at model scale, and ``real_description``.
    * ``extractors``: name -> feature module, the primary first; ``extractor_notes`` say what each is.
    * ``classifier``: a module whose output is logits (the confidence oracle), or None.
    * ``primary_oracle``: the oracle whose worst images the goal asks to detect.
    * ``posterior_path``: the default posterior's file, or None (a diag GGN fitted on ``real``);
      ``posterior_note`` says which.
    * ``repeated``: method name -> a factory ``(config, scheduler) -> sampler`` for the methods that
      sample other UNets (their weights exist for the bundled digits only).
    """

    name: str
    description: str
    unet: torch.nn.Module
    scheduler: object
    real: torch.Tensor
    real_description: str
    extractors: dict[str, torch.nn.Module]
    extractor_notes: dict[str, str]
    classifier: torch.nn.Module | None
    primary_oracle: str
    posterior_path: Path | None
    posterior_note: str
    repeated: dict[str, Callable] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return next(iter(self.extractors))

    @property
    def oracles(self) -> tuple[str, ...]:
        return ("confidence", "realism") if self.classifier is not None else ("realism",)

    @property
    def shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))


def _ddim(base):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base.config, clip_sample=False, thresholding=False)


def _random_conv(channels: int):
    from bayesdiff_ext.metrics import RandomConvFeatures

    return RandomConvFeatures(in_channels=channels, seed=0)


RANDOM_CONV_NOTE = "a fixed-seed random conv net (64-d; no training, a sanity check)"


def _bundled(name: str, posterior: str | None) -> Subject:
    from bayesdiff_ext import digits, photos
    from bayesdiff_ext.io.inputs import load_model
    from bayesdiff_ext.metrics import FeatureModule

    module = digits if name == "digits" else photos
    root = module.bundled_dir()
    unet, scheduler = load_model(root)
    size = unet.config.sample_size
    channels = unet.config.in_channels
    classifier = module.load_bundled_classifier()
    if name == "digits":
        real, _ = digits.load_digits_images(size)
        description = f"the bundled {size}×{size} digits UNet"
        real_description = f"all {len(real)} scikit-learn digits ({size}×{size})"
        classes = "10-class digits classifier"
        primary_oracle = "confidence"
    else:
        real, _ = photos.load_photo_crops(resolution=size)
        description = f"the bundled {size}×{size} RGB photo-crops UNet"
        real_description = (
            f"the model's {len(real)} crops of scikit-learn's two sample photos (seed 0, {size}×{size})"
        )
        classes = f"{photos.NUM_CLASSES}-class crop classifier (photo × quadrant)"
        # Smooth crops (sky, blurred background) belong to several quadrants, so the classifier's
        # confidence marks ambiguous crops as well as bad ones (see the model card).
        primary_oracle = "realism"
    return Subject(
        name=name,
        description=description,
        unet=unet,
        scheduler=_ddim(scheduler),
        real=real,
        real_description=real_description,
        extractors={"classifier": FeatureModule(classifier), "random_conv": _random_conv(channels)},
        extractor_notes={"classifier": f"the bundled {classes}'s 128-d embedding", "random_conv": RANDOM_CONV_NOTE},
        classifier=classifier,
        primary_oracle=primary_oracle,
        posterior_path=Path(posterior) if posterior else root / "posterior_diag.safetensors",
        posterior_note=f"the posterior {posterior}" if posterior else "the bundled posterior",
        repeated=_bundled_repeated(root) if name == "digits" else {},
    )


def _bundled_repeated(root: Path) -> dict[str, Callable]:
    """MC dropout and the deep ensemble, where their bundled weights exist."""
    from bayesdiff_ext.digits import load_bundled_unet
    from bayesdiff_ext.methods import EnsembleSampler, MCDropoutSampler

    found = {}
    if (root / "unet_dropout" / "config.json").is_file():
        found["mc_dropout"] = lambda config, scheduler: MCDropoutSampler(
            load_bundled_unet(dropout=True), scheduler, passes=config.dropout_passes, seed=config.seed
        )
    members = [root / "ensemble" / f"member_{k}" / "unet" / "config.json" for k in range(ENSEMBLE_MEMBERS)]
    if all(p.is_file() for p in members):
        found["ensemble"] = lambda config, scheduler: EnsembleSampler(
            [load_bundled_unet(ensemble_member=k) for k in range(ENSEMBLE_MEMBERS)], scheduler
        )
    return found


def _folder(config) -> Subject:
    from bayesdiff_ext.io.inputs import load_images, load_model
    from bayesdiff_ext.metrics import load_feature_module

    unet, scheduler = load_model(config.model, config.scheduler)
    channels, size = unet.config.in_channels, unet.config.sample_size
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"the model's sample_size {tuple(size)} is not square; evaluate it from Python")
        size = size[0]
    real = load_images(config.data, size=size, channels=channels)
    extractors, notes = {}, {}
    if config.features not in (None, "random_conv"):
        extractors["features"] = load_feature_module(config.features)
        notes["features"] = f"the TorchScript extractor {config.features}"
    extractors["random_conv"] = _random_conv(channels)
    notes["random_conv"] = RANDOM_CONV_NOTE
    classifier = None if config.classifier is None else load_feature_module(config.classifier)
    posterior = None if config.posterior is None else Path(config.posterior)
    return Subject(
        name=Path(config.model).resolve().name,
        description=f"the model in {config.model} ({size}×{size}, {channels} channels)",
        unet=unet,
        scheduler=_ddim(scheduler),
        real=real,
        real_description=f"the {len(real)} images of {config.data}",
        extractors=extractors,
        extractor_notes=notes,
        classifier=classifier,
        primary_oracle="confidence" if classifier is not None else "realism",
        posterior_path=posterior,
        posterior_note=f"the posterior {posterior}" if posterior else "a diag GGN fitted on the real images",
    )


def load_subject(config) -> Subject:
    """The :class:`Subject` that ``config.model`` (and ``data``, ``features``, ``classifier``,
    ``posterior``) name."""
    if config.builtin is not None:
        if any(getattr(config, name) is not None for name in ("scheduler", "data", "features", "classifier")):
            raise ValueError(
                f"{config.model} brings its own scheduler, data, feature space and classifier; scheduler, data, "
                "features and classifier are for a model folder"
            )
        return _bundled(config.builtin, config.posterior)
    return _folder(config)

"""Feature extractors: the protocol, a torchmetrics-compatible adapter, and batched extraction."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything with ``features(x) -> (N, d)``. Modules without it are used through their forward."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def feature_function(module) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""
    Args:
        module (callable or object with `features`):
            A feature extractor.

    Returns:
        The callable that maps images to features: `module.features` if present, else `module` (so a classifier
        with `features`, such as the bundled digits classifier, is used for its embedding, not its logits).
    """
    features = getattr(module, "features", None)
    if callable(features):
        return features
    if callable(module):
        return module
    raise TypeError(f"module: expected a callable or an object with features(x), got {type(module).__name__}")


def _check_feature_output(out, n: int, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who} returned {type(out).__name__}, expected a tensor of shape (N, d)")
    if out.dim() != 2 or out.shape[0] != n:
        raise ValueError(
            f"{who} returned shape {tuple(out.shape)} for a batch of {n}; expected (N, d) "
            "(flatten pooled features, e.g. with torch.flatten(x, 1))"
        )
    return out


class FeatureModule(nn.Module):
    r"""
    Wraps a feature extractor so that `forward` returns its features `(N, num_features)`.

    Pass it as `torchmetrics.image.FrechetInceptionDistance(feature=FeatureModule(m))` (or
    `KernelInceptionDistance`): torchmetrics calls `forward` and reads `num_features` (without it, it would
    probe the module with a random 3×299×299 image).

    Args:
        module (`FeatureExtractor` or callable):
            Has `features(x)`, or maps a batch to features itself.
        num_features (`int`, *optional*):
            The feature width d; defaults to the module's `num_features` or `feature_dim`.

    Raises:
        `ValueError`: no width is given or found. `forward` raises one when the module returns another shape.
    """

    def __init__(self, module, num_features: Optional[int] = None):
        super().__init__()
        feature_function(module)  # fail here, not at the first forward, if it is not usable
        self.module = module
        if num_features is None:
            num_features = getattr(module, "num_features", None) or getattr(module, "feature_dim", None)
        if num_features is None:
            raise ValueError(
                f"num_features: {type(module).__name__} has no num_features or feature_dim attribute; "
                "pass num_features=d explicitly"
            )
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _check_feature_output(feature_function(self.module)(x), x.shape[0], type(self.module).__name__)
        if out.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self.module).__name__} returned {out.shape[1]} features, "
                f"expected num_features = {self.num_features}"
            )
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def _module_device(module) -> Optional[torch.device]:
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return None


def _module_float_dtype(module) -> Optional[torch.dtype]:
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return None


@contextlib.contextmanager
def _eval_mode(module):
    """Eval mode for the duration of the extraction; the module's own mode is restored after."""
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def extract_features(
    module,
    images: Union[torch.Tensor, np.ndarray],
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> np.ndarray:
    r"""
    Features of a set of images, batch by batch. The module runs in eval mode under `torch.no_grad` and gets
    its train/eval mode back afterwards; it is never moved.

    Args:
        module (`FeatureExtractor` or callable):
            Has `features(x)`, or maps a batch to features `(batch_size, d)` itself.
        images (`torch.Tensor` or `numpy.ndarray` of shape `(N, ...)`):
            The images. Floating-point batches are cast to the module's parameter dtype; integer images (e.g.
            uint8 for an Inception network) pass unchanged.
        batch_size (`int`, *optional*, defaults to 256):
            Images per call.
        device (`str` or `torch.device`, *optional*):
            Where batches go; defaults to the module's parameter device, else the CPU.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar.

    Returns:
        `numpy.ndarray` of shape `(N, d)`: the features, float64.
    """
    fn = feature_function(module)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"images: expected a torch tensor or numpy array (N, ...), got {type(images).__name__}"
        )
    if images.dim() < 1 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")

    module_device = _module_device(module)
    if device is None:
        device = module_device or torch.device("cpu")
    device = torch.device(device)
    if module_device is not None and module_device.type != device.type:
        raise ValueError(
            f"device: the module's parameters are on {module_device}, but device={device} was requested"
        )
    cast_to = _module_float_dtype(module)

    n = images.shape[0]
    out: Optional[np.ndarray] = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="img", desc="features")
    try:
        with _eval_mode(module), torch.no_grad():
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size].to(device)
                if cast_to is not None and batch.is_floating_point():
                    batch = batch.to(cast_to)
                feats = _check_feature_output(fn(batch), batch.shape[0], type(module).__name__)
                if out is None:
                    out = np.empty((n, feats.shape[1]), dtype=np.float64)
                out[start : start + batch.shape[0]] = feats.detach().to("cpu", torch.float64).numpy()
                if bar is not None:
                    bar.update(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return out

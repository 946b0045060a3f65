"""Load feature extractors from local files, and the default one for the bundled digits model.

Nothing here downloads: Inception or CLIP weights must already be on disk.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from bayesdiff_ext.metrics.extraction import FeatureModule

PathLike = Union[str, os.PathLike]


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    return state


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 flags torch.jit.load as deprecated; reading an existing archive (e.g. the
            # TorchScript Inception of clean-fid / StyleGAN) is still what the user asked for.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a TorchScript archive; to load a state dict pass module=<the nn.Module "
            "(instance or class) the weights belong to>"
        ) from err


def load_feature_module(
    path: PathLike,
    module: Optional[Union[nn.Module, Callable[[], nn.Module]]] = None,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> nn.Module:
    r"""
    Load a user-supplied feature extractor from a local file (weights are never downloaded).

    The module is used through `features(x)` if it has one, else its forward; wrap it in :class:`FeatureModule`
    to pass it to torchmetrics.

    Args:
        path (`str` or `os.PathLike`):
            With `module=None`, a TorchScript archive (`torch.jit.save`, e.g. the Inception network of clean-fid
            / StyleGAN); otherwise the module's state dict (`.safetensors`, or a `torch.save`'d dict read with
            `weights_only=True`).
        module (`torch.nn.Module` or zero-argument factory, *optional*):
            The module (or class) the state dict belongs to.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the module goes.
        strict (`bool`, *optional*, defaults to `True`):
            Passed to `load_state_dict`.

    Returns:
        `torch.nn.Module`: the extractor, in eval mode with frozen parameters.

    Raises:
        `FileNotFoundError`: `path` does not exist. `ValueError`: it is not what `module` says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"feature extractor weights not found at {path}. Nothing is downloaded: point at a local "
            "TorchScript archive, or a state dict together with module=..."
        )
    device = torch.device(device)
    if module is None:
        loaded = _load_torchscript(path, device)
    else:
        loaded = module if isinstance(module, nn.Module) else module()
        if not isinstance(loaded, nn.Module):
            raise TypeError(
                f"module: expected an nn.Module or a factory returning one, got {type(loaded).__name__}"
            )
        loaded.load_state_dict(_load_state_dict(path), strict=strict)
        loaded = loaded.to(device)
    loaded.eval()
    # ScriptModule lacks requires_grad_, so freeze parameter by parameter.
    for param in loaded.parameters():
        param.requires_grad_(False)
    return loaded


def digits_feature_extractor(
    root: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"
) -> FeatureModule:
    r"""
    The default extractor for the bundled digits model: the bundled classifier's embedding, loaded when called.

    Args:
        root (`str` or `os.PathLike`, *optional*):
            The assets folder; defaults to the bundled one.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where the classifier goes.

    Returns:
        `FeatureModule`: its `forward` maps images `(N, 1, 16, 16)` at model scale to features
        `(N, feature_dim)` (128 for the bundled classifier).

    Raises:
        `FileNotFoundError`: the assets are missing (the message names the command that regenerates them).
    """
    from bayesdiff_ext.digits import load_bundled_classifier

    return FeatureModule(load_bundled_classifier(root=root, device=device))

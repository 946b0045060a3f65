"""save/load of a LastLayerLaplace: one safetensors file, settings as JSON in its header metadata.

The other posteriors (``inference``) write the same layout through ``write_posterior_file`` with
their own tensor prefix and extra metadata; ``loading.load_posterior`` opens any of them.

Layout: tensors ``curvature.<name>`` (float64, the structure's curvature without σ or δ) and one
metadata entry ``bayesdiff_ext.posterior`` holding a JSON object: format version, structure,
curvature, σ/δ/T and how they were chosen, the head (kind, shapes, geometry, ε channels), the
fitting statistics (images, samples, timesteps per image, residual sum of squares), a SHA-256 of
the head's MAP weights, package versions and the UTC date. Written to a temporary file in the
target directory and moved into place with os.replace, so a reader never sees a partial file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bayesdiff_ext.posterior.fitting import FitStatistics
from bayesdiff_ext.posterior.heads import HeadSpec, eps_parameters, head_spec, locate_head

METADATA_KEY = "bayesdiff_ext.posterior"
FORMAT_VERSION = 1
TENSOR_PREFIX = "curvature."


def head_fingerprint(head: torch.nn.Module, spec: HeadSpec) -> str:
    """SHA-256 of the ε weights and biases (float64 bytes): detects a posterior for other weights."""
    digest = hashlib.sha256()
    for t in eps_parameters(head, spec):
        if t is not None:
            digest.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _versions() -> dict:
    import bayesdiff_ext

    versions = {"bayesdiff_ext": bayesdiff_ext.__version__, "torch": torch.__version__}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        versions["diffusers"] = None
    return versions


def posterior_metadata(post) -> dict:
    """The settings every saved posterior records (``post``: a LastLayerLaplace or another
    posterior with the same attributes)."""
    return {
        "format_version": FORMAT_VERSION,
        "structure": post.structure,
        "curvature": post.curvature,
        "sigma_noise": post.sigma_noise,
        "sigma_noise_choice": post.sigma_choice,
        "prior_precision": post.prior_precision,
        "prior_precision_choice": post.prior_choice,
        "temperature": post.temperature,
        "head": post.spec.describe(),
        "head_sha256": head_fingerprint(post.head, post.spec),
        "fit": None if post.fit_stats is None else dataclasses.asdict(post.fit_stats),
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_posterior_file(path, meta: dict, tensors: dict[str, torch.Tensor], prefix: str = TENSOR_PREFIX) -> None:
    """Write ``tensors`` (names prefixed) and ``meta`` atomically to ``path``."""
    tensors = {prefix + k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_posterior(post, path) -> None:
    write_posterior_file(path, posterior_metadata(post), post._fitted().tensors())


def read_posterior_file(path, prefix: str | None = TENSOR_PREFIX) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and the tensors (names under ``prefix``; none for None) of a saved posterior."""
    with safe_open(os.fspath(path), framework="pt") as f:
        header = f.metadata() or {}
        if METADATA_KEY not in header:
            raise ValueError(f"{path} is not a saved bayesdiff_ext posterior (no {METADATA_KEY!r} metadata)")
        names = [] if prefix is None else [k for k in f.keys() if k.startswith(prefix)]
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in names}
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has posterior format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta, tensors


def matching_head(meta: dict, path, model, head) -> tuple[torch.nn.Module, HeadSpec]:
    """The model's head and the saved head's spec; ValueError if their shapes differ, a warning if
    the weights differ from those the posterior was fitted at."""
    saved = HeadSpec.from_description(meta["head"])
    target_head = locate_head(model, head)
    current = head_spec(target_head, min(saved.eps_channels, _out_channels(target_head)))
    if current != saved:
        raise ValueError(
            f"the posterior in {path} was fitted for the head {saved.shape_text()}, but this model's head is "
            f"{current.shape_text()}"
        )
    if head_fingerprint(target_head, saved) != meta["head_sha256"]:
        warnings.warn(
            f"the head weights differ from those the posterior in {path} was fitted at (same shape); "
            "its curvature and hyperparameters belong to the other weights",
            stacklevel=4,
        )
    return target_head, saved


def load_posterior(cls, path, model, head):
    from bayesdiff_ext.posterior.last_layer_laplace import STRUCTURES

    meta, tensors = read_posterior_file(path)
    inference = meta.get("inference", "laplace")
    if inference != "laplace":
        raise ValueError(
            f"{path} holds a {inference!r} posterior, not a Laplace one; load it with "
            "bayesdiff_ext.posterior.load_posterior(path, model)"
        )
    target_head, saved = matching_head(meta, path, model, head)
    post = cls(
        model,
        meta["structure"],
        meta["curvature"],
        head=target_head,
        eps_channels=saved.eps_channels,
        sigma_noise=meta["sigma_noise_choice"],
        prior_precision=meta["prior_precision_choice"],
        temperature=meta["temperature"],
    )
    post.posterior = STRUCTURES[meta["structure"]].from_tensors(saved, tensors)
    post.fit_stats = None if meta["fit"] is None else FitStatistics(**meta["fit"])
    post.sigma_noise, post.prior_precision = meta["sigma_noise"], meta["prior_precision"]
    return post


def _out_channels(head: torch.nn.Module) -> int:
    return head.out_channels if isinstance(head, torch.nn.Conv2d) else head.out_features

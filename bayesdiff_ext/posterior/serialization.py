"""save/load of a LastLayerLaplace: one safetensors file, settings as JSON in its header metadata.

Layout: tensors ``curvature.<name>`` (float64, the structure's curvature without σ or δ) and one
metadata entry ``bayesdiff_ext.posterior`` holding a JSON object: format version, structure,
curvature, σ/δ/T and how they were chosen, the head (kind, shapes, geometry, ε channels), the
fitting statistics (images, samples, timesteps per image, residual sum of squares), a SHA-256 of
the head's MAP weights, package versions and the UTC date. Written atomically
(``bayesdiff_ext.io.atomic``), so a reader never sees a partial file.

The other posteriors (``inference``) write the same layout through ``posterior_metadata`` and
``write_posterior_file`` with their own tensor prefix and extra metadata (``inference`` names them);
``load_posterior`` here reads Laplace files only, ``loading.load_posterior`` any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from bayesdiff_ext._version import __version__, library_versions
from bayesdiff_ext.io.atomic import atomic_write
from bayesdiff_ext.posterior.fitting import FitStatistics
from bayesdiff_ext.posterior.heads import HeadSpec, eps_parameters, head_spec, locate_head, output_channels
from bayesdiff_ext.posterior.registry import restore_structure
from bayesdiff_ext.posterior.structure import PosteriorStructure

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


def posterior_metadata(post) -> dict:
    """The settings every saved posterior records (``post``: a LastLayerLaplace, or another posterior
    with the same attributes)."""
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
        "eps_channels": post.eps_channels,
        "head_sha256": head_fingerprint(post.head, post.spec),
        "fit": None if post.fit_stats is None else dataclasses.asdict(post.fit_stats),
        "versions": library_versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_posterior_file(path, meta: dict, tensors: dict[str, torch.Tensor], prefix: str = TENSOR_PREFIX) -> None:
    """Write ``tensors`` (float64, names under ``prefix``) and ``meta`` atomically to ``path``."""
    tensors = {prefix + k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}
    atomic_write(path, save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))


def save_posterior(post, path) -> None:
    """Write the fitted ``LastLayerLaplace`` ``post`` to ``path`` (its public state only)."""
    if post.posterior is None:
        raise RuntimeError("the posterior is not fitted yet: call fit(...), fit_features(...) or load(...)")
    write_posterior_file(path, posterior_metadata(post), post.posterior.tensors())


def read_posterior_file(path, prefix: str | None = TENSOR_PREFIX) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and the tensors (names under ``prefix``; none for None) of a saved posterior; one
    clear error for a file that is missing, truncated, of another kind or of another format version.
    Nothing is unpickled."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"posterior file {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"posterior file {path} is a folder; give the .safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            if METADATA_KEY not in header:
                raise ValueError(f"{path} is not a saved bayesdiff_ext posterior (no {METADATA_KEY!r} metadata)")
            names = [] if prefix is None else [k for k in f.keys() if k.startswith(prefix)]
            tensors = {k[len(prefix) :]: f.get_tensor(k) for k in names}
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a posterior file: safetensors cannot read it ({err}); "
            "it is truncated or of another format"
        ) from None
    with damaged_file(path):
        meta = json.loads(header[METADATA_KEY])
        version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has posterior format version {version}, but this bayesdiff_ext ({__version__}) reads "
            f"version {FORMAT_VERSION}: load it with the bayesdiff_ext that wrote it ({_writer(meta)}), or refit"
        )
    return meta, tensors


def _writer(meta: dict) -> str:
    versions = meta.get("versions")
    writer = versions.get("bayesdiff_ext") if isinstance(versions, dict) else None
    return f"version {writer}" if writer else "version unknown"


@contextlib.contextmanager
def damaged_file(path):
    """Reading a posterior file's contents: a missing entry or one of the wrong type is a ValueError
    that names the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is a damaged posterior file: {type(err).__name__} {err} in its contents"
        ) from None


def matching_head(meta: dict, path, model, head) -> tuple[torch.nn.Module, HeadSpec]:
    """``model``'s head and the saved head's spec: ValueError if the head's shape differs from the
    saved one, a warning if only its weights differ."""
    saved = HeadSpec.from_description(meta["head"])
    target_head = locate_head(model, head)
    current = head_spec(target_head, min(saved.eps_channels, output_channels(target_head)), saved.eps_rows)
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


@dataclasses.dataclass(frozen=True)
class SavedPosterior:
    """A saved posterior, restored onto the head of the model it is loaded for."""

    head: torch.nn.Module
    spec: HeadSpec
    eps_channels: int  # the model's output channels that are ε (for a patch transformer ≠ spec's rows)
    structure: str
    curvature: str
    posterior: PosteriorStructure
    fit_stats: FitStatistics | None
    sigma_noise: float
    prior_precision: float
    sigma_choice: str | float
    prior_choice: str | float
    temperature: float


def load_posterior(path, model, head=None) -> SavedPosterior:
    """Read a saved Laplace posterior for ``model``'s head: ValueError if the file holds another kind of
    posterior or the head's shape differs from the saved one, a warning if only its weights differ."""
    meta, tensors = read_posterior_file(path)
    with damaged_file(path):
        inference = meta.get("inference", "laplace")
        if inference != "laplace":
            raise ValueError(
                f"{path} holds a {inference!r} posterior, not a Laplace one; load it with "
                "bayesdiff_ext.posterior.load_posterior(path, model)"
            )
        target_head, saved = matching_head(meta, path, model, head)
        return SavedPosterior(
            head=target_head,
            spec=saved,
            eps_channels=meta.get("eps_channels", saved.eps_channels),
            structure=meta["structure"],
            curvature=meta["curvature"],
            posterior=restore_structure(meta["structure"], saved, tensors),
            fit_stats=None if meta["fit"] is None else FitStatistics(**meta["fit"]),
            sigma_noise=meta["sigma_noise"],
            prior_precision=meta["prior_precision"],
            sigma_choice=meta["sigma_noise_choice"],
            prior_choice=meta["prior_precision_choice"],
            temperature=meta["temperature"],
        )

"""Classifier-free guidance with a Bayesian head: ε_cfg and its variance (docs/MATH.md §2).

Guidance combines the unconditional and conditional predictions, ε_cfg = (1−s)·ε_u + s·ε_c. Both
come from the *same* head weights θ, so with a head linear in θ,

    ε_cfg(θ) = (1−s)·head_θ(φ_u) + s·head_θ(φ_c) = head_θ((1−s)·φ_u + s·φ_c)

(the bias enters with weight (1−s) + s = 1). Hence the exact variance is the head's closed-form
variance at φ_cfg = (1−s)·φ_u + s·φ_c, and its mean is the guided prediction itself. BayesDiff's
code treats the branches as independent, (1−s)²·V_u + s²·V_c, which drops the covariance
2s(1−s)·Cov(ε_u, ε_c) — for s > 1 that term is negative and large, the branches being nearly equal.
That formula is kept as ``variance='independent'`` for comparison with the paper.

Both branches run in one UNet call on a batch laid out [uncond; cond], as the diffusers pipelines
do; conditioning is concatenated the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GUIDANCE_VARIANCES",
    "ClassifierFreeGuidance",
    "check_guidance_variance",
    "combine",
    "guided_head_moments",
    "split_branches",
    "stack_branches",
]

GUIDANCE_VARIANCES = ("exact", "independent")


def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s·(cond − uncond), the diffusers pipelines' own expression: ε_cfg matches theirs bitwise."""
    return uncond + scale * (cond - uncond)


def guided_head_moments(
    posterior, phi: torch.Tensor, scale: float, variance: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) of ε_cfg from the head input φ of a [uncond; cond] batch of 2N rows.

    ``'exact'``: ``posterior.predict(φ_cfg)``, φ_cfg = (1−s)·φ_u + s·φ_c. ``'independent'``: the
    paper's (1−s)²·V_u + s²·V_c with V from ``posterior.predict`` on each branch. Returns N rows.
    """
    check_guidance_variance(variance)
    if phi.shape[0] % 2:
        raise ValueError(
            f"phi must stack the [uncond; cond] branches, an even number of rows, got {phi.shape[0]}"
        )
    phi_uncond, phi_cond = phi.chunk(2)
    if variance == "exact":
        return posterior.predict(combine(phi_uncond, phi_cond, scale))
    mean, var = posterior.predict(phi)
    mean_uncond, mean_cond = mean.chunk(2)
    var_uncond, var_cond = var.chunk(2)
    return combine(mean_uncond, mean_cond, scale), (1 - scale) ** 2 * var_uncond + scale**2 * var_cond


def stack_branches(uncond: Any, cond: Any, rows: int) -> Any:
    """The UNet kwargs of a [uncond; cond] call from those of each branch, each for ``rows`` images.

    Tensors whose leading dimension is ``rows`` in both are concatenated [uncond; cond] (nested
    dicts, lists and tuples too); anything else (flags, ``cross_attention_kwargs`` values, broadcast
    tensors) must be equal in both and passes through once.
    """
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        if cond.dim() > 0 and cond.shape[0] == rows and uncond.shape[0] == rows:
            return torch.cat([uncond, cond])
    elif isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(
                f"the unconditional kwargs have keys {sorted(uncond)} "
                f"but the conditional ones have {sorted(cond)}"
            )
        return {key: stack_branches(uncond[key], cond[key], rows) for key in cond}
    elif isinstance(cond, (list, tuple)) and type(cond) is type(uncond) and len(cond) == len(uncond):
        return type(cond)(stack_branches(u, c, rows) for u, c in zip(uncond, cond, strict=True))
    if not _same(uncond, cond):
        raise ValueError(
            f"an unconditional kwarg ({type(uncond).__name__}) differs from the conditional one "
            f"({type(cond).__name__}) but is not a batch of {rows} rows that could be stacked"
        )
    return cond


def split_branches(kwargs: Any, rows: int) -> tuple[Any, Any]:
    """The inverse of :func:`stack_branches`: the (uncond, cond) kwargs of a [uncond; cond] call.

    Tensors with ``2·rows`` leading rows are split in halves; anything else is shared.
    """
    if isinstance(kwargs, torch.Tensor) and kwargs.dim() > 0 and kwargs.shape[0] == 2 * rows:
        uncond, cond = kwargs.chunk(2)
        return uncond, cond
    if isinstance(kwargs, Mapping):
        pairs = {key: split_branches(value, rows) for key, value in kwargs.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(kwargs, (list, tuple)):
        pairs = [split_branches(value, rows) for value in kwargs]
        return type(kwargs)(p[0] for p in pairs), type(kwargs)(p[1] for p in pairs)
    return kwargs, kwargs


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a truth value: only identity counts
        return False


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Guidance for :class:`~bayesdiff_ext.BayesDiffSampler`: scale s, unconditional branch, variance rule.

    ``uncond_kwargs`` are the UNet kwargs of the unconditional branch for the B images (e.g.
    ``{"encoder_hidden_states": negative_prompt_embeds}``); keys it lacks are shared with the
    conditional kwargs (``unet_kwargs`` of ``sample``). ``variance``: ``'exact'`` (default) or
    ``'independent'`` (BayesDiff's code).
    """

    scale: float
    uncond_kwargs: Mapping[str, Any] = field(default_factory=dict)
    variance: str = "exact"

    def __post_init__(self) -> None:
        check_guidance_variance(self.variance)
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"guidance scale must be a finite number, got {self.scale!r}")
        if not isinstance(self.uncond_kwargs, Mapping):
            raise TypeError(
                f"uncond_kwargs must be a dict of UNet kwargs, got {type(self.uncond_kwargs).__name__}"
            )

    def branch_kwargs(self, cond_kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Both branches' kwargs for B rows, ``{"uncond": ..., "cond": ...}``; tile it like any kwargs."""
        return {"uncond": {**cond_kwargs, **self.uncond_kwargs}, "cond": dict(cond_kwargs)}

    def forward(self, denoiser, posterior, x: torch.Tensor, t, branch_kwargs: Mapping[str, Any], want_head: bool):
        """One model call on [x; x]: (ε_cfg, head mean, head var); the head moments only with ``want_head``.

        ``denoiser`` is a :class:`~bayesdiff_ext.denoiser.Denoiser` (called ``denoiser(sample, t, kwargs)``);
        ``branch_kwargs`` is :meth:`branch_kwargs`' result, tiled to the rows of ``x``.
        """
        rows = x.shape[0]
        kwargs = stack_branches(branch_kwargs["uncond"], branch_kwargs["cond"], rows)
        doubled = torch.cat([x, x])
        if not want_head:
            return combine(*denoiser(doubled, t, kwargs).chunk(2), self.scale), None, None
        with posterior.capture() as cap:
            out = denoiser(doubled, t, kwargs)
        head_mean, head_var = guided_head_moments(posterior, cap.phi, self.scale, self.variance)
        return combine(*out.chunk(2), self.scale), head_mean, head_var


def check_guidance_variance(variance: str) -> None:
    """ValueError unless ``variance`` is one of :data:`GUIDANCE_VARIANCES`."""
    if variance not in GUIDANCE_VARIANCES:
        raise ValueError(f"guidance variance must be one of {GUIDANCE_VARIANCES}, got {variance!r}")

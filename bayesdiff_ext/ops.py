"""The Python face of the compiled ops: keyword arguments, optional value checks, fake impls.

The compiled ops check shapes, dtypes and devices themselves (errors name the argument); the
wrappers here add what costs an extra pass over the data and is therefore optional: NaN/inf and
negative-variance checks (``check_values=True``).
"""

from __future__ import annotations

import torch

from bayesdiff_ext import _C  # noqa: F401  (loads the library that defines the ops)
from bayesdiff_ext._fake_ops import register_fakes, result_dtype

register_fakes("bayesdiff_ext")

__all__ = ["check_finite", "check_nonnegative", "mc_moments", "moment_step", "result_dtype"]


def check_finite(name: str, t: torch.Tensor | None) -> None:
    """Raise ValueError naming `name` if `t` holds a NaN or an infinity."""
    if t is not None and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
        raise ValueError(f"`{name}` contains {bad}")


def check_nonnegative(name: str, t: torch.Tensor | None) -> None:
    """Raise ValueError naming `name` if the variance `t` has a negative entry."""
    check_finite(name, t)
    if t is not None and bool((t < 0).any()):
        raise ValueError(f"`{name}` is a variance and must be >= 0, but its minimum is {float(t.min()):.3g}")


def moment_step(
    mean_x: torch.Tensor,
    var_x: torch.Tensor,
    eps_mean: torch.Tensor,
    eps_var: torch.Tensor | None = None,
    cov_x_eps: torch.Tensor | None = None,
    *,
    a: float,
    b: float,
    c2: float = 0.0,
    clamp: bool = True,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One affine sampler step x' = a·x + b·ε + c·z on per-element moments (SPEC §2).

    Returns ``(mean_next, var_next)`` with ``mean_next = a·mean_x + b·eps_mean`` and
    ``var_next = a²·var_x + 2ab·cov_x_eps + b²·eps_var + c2`` (clamped at 0 when ``clamp``).
    ``eps_var`` and ``cov_x_eps`` default to zero. Outputs are contiguous, float32 for 16-bit
    inputs and otherwise of the input dtype.
    """
    if check_values:
        for name, t in (("mean_x", mean_x), ("eps_mean", eps_mean), ("cov_x_eps", cov_x_eps)):
            check_finite(name, t)
        check_nonnegative("var_x", var_x)
        check_nonnegative("eps_var", eps_var)
    return torch.ops.bayesdiff_ext.moment_step(
        mean_x, var_x, eps_mean, eps_var, cov_x_eps, float(a), float(b), float(c2), bool(clamp)
    )


def mc_moments(
    x: torch.Tensor,
    eps_mean: torch.Tensor,
    eps_var: torch.Tensor | None,
    mean_x: torch.Tensor,
    *,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments of ε_t from S Monte Carlo samples, in one pass (SPEC §2).

    ``x``, ``eps_mean`` and ``eps_var`` have shape (S, *shape); ``mean_x`` has shape ``shape``.
    Returns ``(e_eps, var_eps, cov_x_eps)``: the mean of ε, its total variance (mean of the head
    variances plus the population variance of the head means) and Cov(x, ε) about ``mean_x``.
    """
    if check_values:
        for name, t in (("x", x), ("eps_mean", eps_mean), ("mean_x", mean_x)):
            check_finite(name, t)
        check_nonnegative("eps_var", eps_var)
    return torch.ops.bayesdiff_ext.mc_moments(x, eps_mean, eps_var, mean_x)

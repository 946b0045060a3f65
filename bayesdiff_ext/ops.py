"""The Python face of the compiled ops: keyword arguments, optional value checks, fake impls.

The compiled ops check shapes, dtypes and devices themselves (errors name the argument). Values
are not checked on the hot path: a check reads the data once more and, on a GPU, waits for it
(a host synchronisation per call). Instead every op returns variances clamped at 0 (a negative
input variance can never give a negative output; NaN stays NaN), and the wrappers offer the value
checks as an option (``check_values=True``). Posterior variances live long: check them once where
they are made, with :func:`check_nonnegative`.
"""

from __future__ import annotations

import torch

from bayesdiff_ext import _C  # noqa: F401  (loads the library that defines the ops)
from bayesdiff_ext._fake_ops import register_fakes, result_dtype

register_fakes("bayesdiff_ext")

__all__ = [
    "check_finite",
    "check_nonnegative",
    "conv_diag_ef",
    "conv_diag_ggn",
    "conv_head_mean_var",
    "conv_head_var_factored",
    "conv_patch_gram",
    "linear_diag_ef",
    "linear_diag_ggn",
    "linear_gram",
    "linear_head_mean_var",
    "mc_moments",
    "moment_step",
    "result_dtype",
]


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


def _check_values(
    finite: dict[str, torch.Tensor | None], variances: dict[str, torch.Tensor | None]
) -> None:
    """``check_values=True`` of every wrapper: all inputs first for NaN/inf, then the variances
    for negative entries, so that the first bad argument in that order is the one named."""
    for name, t in finite.items():
        check_finite(name, t)
    for name, t in variances.items():
        check_nonnegative(name, t)


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
    """One affine sampler step x' = a·x + b·ε + c·z on per-element moments (docs/MATH.md §2).

    Args:
        mean_x, var_x, eps_mean (`torch.Tensor`, one shape): E[x_t], Var[x_t], E[ε_t].
        eps_var, cov_x_eps (`torch.Tensor` of the same shape, optional): Var[ε_t] and
            Cov(x_t, ε_t); zero when absent.
        a, b (`float`): the step's coefficients; finite.
        c2 (`float`): the variance c² of the fresh noise; finite and >= 0.
        clamp (`bool`): clamp ``var_next`` at 0 (the default; a noisy Monte Carlo covariance
            or a negative ``var_x``/``eps_var`` can push the sum below zero). NaN stays NaN.
        check_values (`bool`): first check every input for NaN/inf and the variances for
            negative entries (a ValueError naming the argument); costs a pass and a host sync.

    Returns:
        `(mean_next, var_next)`: ``a·mean_x + b·eps_mean`` and
        ``a²·var_x + 2ab·cov_x_eps + b²·eps_var + c2``, contiguous, float32 for 16-bit inputs
        and otherwise of the input dtype.
    """
    if check_values:
        _check_values(
            finite={"mean_x": mean_x, "eps_mean": eps_mean, "cov_x_eps": cov_x_eps},
            variances={"var_x": var_x, "eps_var": eps_var},
        )
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
    """Moments of ε_t from S Monte Carlo samples, in one pass (docs/MATH.md §2).

    Args:
        x (`torch.Tensor` of shape `(S, *shape)`): the S samples of x_t, S >= 1.
        eps_mean (`torch.Tensor` of shape `(S, *shape)`): the head's mean m^i at each sample.
        eps_var (`torch.Tensor` of shape `(S, *shape)`, optional): the head's variance γ²^i.
        mean_x (`torch.Tensor` of shape `shape`): E[x_t], the centre of the covariance.
        check_values (`bool`): as in :func:`moment_step`.

    Returns:
        `(e_eps, var_eps, cov_x_eps)` of shape ``shape``: the mean of ε, its total variance (mean
        of γ² plus the population variance of m, clamped at 0: only a negative ``eps_var`` can
        make it negative) and Cov(x, ε) about ``mean_x``.
    """
    if check_values:
        _check_values(finite={"x": x, "eps_mean": eps_mean, "mean_x": mean_x}, variances={"eps_var": eps_var})
    return torch.ops.bayesdiff_ext.mc_moments(x, eps_mean, eps_var, mean_x)


def _conv_pair(value: int | tuple[int, int] | list[int], name: str) -> list[int]:
    """An int or a pair, as torch.nn.Conv2d takes it, as the [height, width] list the schemas want."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}")
    return pair


def _stride_padding_dilation(stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    """The geometry keywords every conv op takes, checked in that order, as the schemas want them."""
    return _conv_pair(stride, "stride"), _conv_pair(padding, "padding"), _conv_pair(dilation, "dilation")


def _patch_geometry(kernel_size, stride, padding, dilation) -> tuple[list[int], ...]:
    """The curvature ops' geometry: they take no weight, so the kernel size comes as an argument."""
    return _conv_pair(kernel_size, "kernel_size"), *_stride_padding_dilation(stride, padding, dilation)


def conv_diag_ggn(
    phi: torch.Tensor,
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """Diagonal GGN of ½‖f − y‖² for the weight of a Conv2d head (groups=1), summed over a batch.

    ``phi`` (N, C_in, H, W) is the head's input. Returns h of shape (C_in, kh, kw) with
    h[j] = Σ_n Σ_p φ_{n,p}[j]², φ_{n,p} the zero-padded im2col patch of output position p of image
    n (docs/MATH.md §1.2). The GGN diagonal of ``weight[c]`` is h for every output channel c; that of the
    bias is N·H_out·W_out. This is laplace-torch's ``DiagLaplace.H`` for BackPackGGN and
    CurvlinopsGGN (factor 1). The batch is never unfolded; float64 for float64 ``phi``, otherwise
    float32 (16-bit inputs are accumulated in float32). Sum over batches by adding the results.
    """
    return torch.ops.bayesdiff_ext.conv_diag_ggn(
        phi, *_patch_geometry(kernel_size, stride, padding, dilation)
    )


def conv_diag_ef(
    phi: torch.Tensor,
    residual: torch.Tensor,
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    with_bias: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal empirical Fisher of ½‖f − y‖² for a Conv2d head (groups=1), per-image gradients.

    ``residual`` = f − y of shape (N, C, H_out, W_out), the same dtype and device as ``phi``.
    Returns the weight part of shape (C, C_in, kh, kw), Σ_n (Σ_p r_n[c, p] φ_{n,p}[j])²
    (docs/MATH.md §1.2), and with ``with_bias=True`` also the bias part (C,), Σ_n (Σ_p r_n[c, p])²
    (a plain torch sum).
    Convention: laplace-torch's BackPackEF and CurvlinopsEF return exactly 2× both parts (they
    square gradients of the sum of squares without the ½); BayesDiff's fit uses that ×2 form —
    multiply by 2 for parity. Never unfolds the batch; float64 for float64 inputs, else float32.
    """
    weight_part = torch.ops.bayesdiff_ext.conv_diag_ef(
        phi, residual, *_patch_geometry(kernel_size, stride, padding, dilation)
    )
    if not with_bias:
        return weight_part
    per_image = residual.to(weight_part.dtype).sum((2, 3))
    return weight_part, (per_image * per_image).sum(0)


def conv_patch_gram(
    phi: torch.Tensor,
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """Gram matrix of the bias-augmented patches of a Conv2d head's input (groups=1).

    Returns A_aug = Σ_n Σ_p [φ_{n,p}; 1][φ_{n,p}; 1]ᵀ of shape (D+1, D+1), D = C_in·kh·kw, rows in
    ``weight.flatten(1)`` order and the bias "1" last (so A_aug[D, D] = N·H_out·W_out). The exact
    last-layer GGN of ½‖f − y‖² is I_C ⊗ A_aug on per-channel blocks [W_c; b_c]
    (docs/MATH.md §1.1); see ``bayesdiff_ext.posterior.curvature_layout`` for laplace-torch's
    parameter order and its KFAC factors. Never unfolds the batch; float64 for float64 ``phi``,
    otherwise float32.
    """
    return torch.ops.bayesdiff_ext.conv_patch_gram(
        phi, *_patch_geometry(kernel_size, stride, padding, dilation)
    )


def linear_diag_ggn(phi: torch.Tensor) -> torch.Tensor:
    """Diagonal GGN of ½‖f − y‖² for the weight of a Linear head, summed over every row of φ.

    Args:
        phi (`torch.Tensor` of shape `(..., D)`): the head's input, e.g. (B, N, D) tokens.

    Returns:
        `torch.Tensor` of shape `(D,)`, float64: h[j] = Σ_rows φ[j]² (docs/MATH.md §1.2), the GGN
        diagonal of ``weight[c]`` for every output c (that of the bias is the number of rows).
        Accumulated in float64 for every input dtype, without a float64 copy of φ.
    """
    return torch.ops.bayesdiff_ext.linear_diag_ggn(phi)


def linear_diag_ef(
    phi: torch.Tensor, residual: torch.Tensor, *, with_bias: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal empirical Fisher of ½‖f − y‖² for a Linear head, from per-sample gradients.

    Args:
        phi (`torch.Tensor` of shape `(N, ..., D)`): the head's input; a sample is one leading
            index (an image), and every row under it (its tokens) adds to that sample's gradient.
        residual (`torch.Tensor` of shape `(N, ..., C)`): f − y at the same rows, same dtype and
            device as ``phi``.
        with_bias (`bool`): also return the bias part.

    Returns:
        The weight part, `torch.Tensor` of shape `(C, D)`: Σ_n (Σ_t r[n, t, c]·φ[n, t, j])²
        (docs/MATH.md §1.2); with ``with_bias=True`` also the bias part `(C,)`: Σ_n (Σ_t r[n, t, c])².
        float64 for every input dtype; no per-token Jacobian and no float64 copy of φ is formed.
        Convention as :func:`conv_diag_ef`: laplace-torch's EF backends give 2× both parts.
    """
    augmented = torch.ops.bayesdiff_ext.linear_diag_ef(phi, residual)  # (C, D + 1), bias column last
    weight_part = augmented[:, :-1]
    return (weight_part, augmented[:, -1]) if with_bias else weight_part


def linear_gram(phi: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the bias-augmented rows of a Linear head's input.

    Args:
        phi (`torch.Tensor` of shape `(..., D)`): the head's input, e.g. (B, N, D) tokens.

    Returns:
        `torch.Tensor` of shape `(D + 1, D + 1)`, float64: A_aug = Σ_rows [φ; 1][φ; 1]ᵀ with the
        bias "1" last (A_aug[D, D] = the number of rows). The exact last-layer GGN of ½‖f − y‖² is
        I_C ⊗ A_aug on per-output blocks [W_c; b_c] (docs/MATH.md §1.1), as for
        :func:`conv_patch_gram`. Accumulated in float64 for every input dtype, tile by tile.
    """
    return torch.ops.bayesdiff_ext.linear_gram(phi)


def _require(name: str, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise TypeError(f"`{name}` is required")
    return t


def _check_diagonal_head_values(phi, weight, bias, weight_var, bias_var) -> None:
    _check_values(
        finite={"phi": phi, "weight": weight, "bias": bias},
        variances={"weight_var": weight_var, "bias_var": bias_var},
    )


def conv_head_mean_var(
    phi: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_var: torch.Tensor | None = None,
    bias_var: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a Conv2d head's output under a diagonal weight posterior
    (docs/MATH.md §1.1).

    Args:
        phi (`torch.Tensor` of shape `(B, C_in, H, W)`): the head's input.
        weight, bias (`torch.Tensor`): the posterior mean, as in ``nn.Conv2d``; bias optional.
        weight_var (`torch.Tensor`, the shape of ``weight``): required; bias_var (`(C,)`, optional):
            the posterior variances. Not checked for negative entries here (see the module
            docstring); the output variance is clamped at 0.
        stride, padding, dilation, groups: the head's convolution, as ``nn.Conv2d`` takes them.
        check_values (`bool`): as in :func:`moment_step`.

    Returns:
        `(mean, var)` of shape `(B, C, H_out, W_out)`: ``conv2d(phi, weight, bias)`` and
        ``max(conv2d(phi², weight_var, bias_var), 0)``, both from one pass over ``phi``; bias
        terms default to zero. Contiguous NCHW, float32 for 16-bit inputs, else the input dtype.
    """
    weight_var = _require("weight_var", weight_var)
    if check_values:
        _check_diagonal_head_values(phi, weight, bias, weight_var, bias_var)
    return torch.ops.bayesdiff_ext.conv_head_mean_var(
        phi,
        weight,
        bias,
        weight_var,
        bias_var,
        *_stride_padding_dilation(stride, padding, dilation),
        int(groups),
    )


def linear_head_mean_var(
    phi: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_var: torch.Tensor | None = None,
    bias_var: torch.Tensor | None = None,
    *,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a Linear head's output under a diagonal weight posterior
    (docs/MATH.md §1.1).

    Args:
        phi (`torch.Tensor` of shape `(..., D)`): the head's input, e.g. (B, N, D) tokens.
        weight, weight_var (`torch.Tensor` of shape `(C, D)`); bias, bias_var (`(C,)`, optional):
            as in :func:`conv_head_mean_var`.
        check_values (`bool`): as in :func:`moment_step`.

    Returns:
        `(mean, var)` of shape `(..., C)`: ``phi @ weight.T + bias`` and
        ``max(phi² @ weight_var.T + bias_var, 0)``.
    """
    weight_var = _require("weight_var", weight_var)
    if check_values:
        _check_diagonal_head_values(phi, weight, bias, weight_var, bias_var)
    return torch.ops.bayesdiff_ext.linear_head_mean_var(phi, weight, bias, weight_var, bias_var)


def conv_head_var_factored(
    phi: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    mix: torch.Tensor,
    bias_var: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    check_values: bool = False,
) -> torch.Tensor:
    """Per-pixel variance of a Conv2d head under a factored posterior (full GGN or KFAC,
    docs/MATH.md §1.1).

    Args:
        phi (`torch.Tensor` of shape `(B, C_in, H, W)`): the head's input.
        proj_weight (`torch.Tensor` of shape `(R, C_in, kh, kw)`): R directions q_r as conv filters.
        proj_bias (`torch.Tensor` of shape `(R,)`, optional): their offsets β_r.
        mix (`torch.Tensor` of shape `(C, R)`): the weights M >= 0 of the squared projections.
        bias_var (`torch.Tensor` of shape `(C,)`, optional): added to every pixel.
        stride, padding, dilation: the head's convolution (groups = 1).
        check_values (`bool`): as in :func:`moment_step`.

    Returns:
        `torch.Tensor` of shape `(B, C, H_out, W_out)`: ``var[b, c, p] = max(Σ_r mix[c, r] ·
        (conv2d(phi, proj_weight, proj_bias)[b, r, p])² + bias_var[c], 0)`` (clamped: a negative
        ``mix`` or ``bias_var`` is not checked here). The (B, R, H, W) projection is never formed
        whole: the kernels work through tiles of pixels. Build the inputs from a laplace-torch
        posterior with ``bayesdiff_ext.posterior.laplace_convert``.
    """
    if check_values:
        _check_values(
            finite={"phi": phi, "proj_weight": proj_weight, "proj_bias": proj_bias},
            variances={"mix": mix, "bias_var": bias_var},
        )
    return torch.ops.bayesdiff_ext.conv_head_var_factored(
        phi,
        proj_weight,
        proj_bias,
        mix,
        bias_var,
        *_stride_padding_dilation(stride, padding, dilation),
    )

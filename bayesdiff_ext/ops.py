"""The Python face of the compiled ops: keyword arguments, optional value checks, fake impls.

The compiled ops check shapes, dtypes and devices themselves (errors name the argument). Values
are not checked on the hot path: a check reads the data once more and, on a GPU, waits for it (a
host synchronisation per call). Instead every variance an op returns is clamped at 0 in the
kernel, so a negative input variance (``weight_var``, ``bias_var``, ``mix``, ``var_x``,
``eps_var``) never gives a negative output; a NaN stays a NaN. The wrappers offer the checks as an
option: with ``check_values=True`` every input is checked for NaN/inf, then every variance for
negative entries, and the first bad argument in that order raises a ValueError naming it.
Posterior variances live long: check them once where they are made, with :func:`check_nonnegative`.
"""

from __future__ import annotations

import torch

from bayesdiff_ext import _C  # noqa: F401  (loads the library that defines the ops)
from bayesdiff_ext._fake_ops import register_fakes
from bayesdiff_ext.numerics import accumulation_dtype as result_dtype  # the dtype every op returns

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
    "mc_moment_step",
    "mc_moments",
    "moment_step",
    "result_dtype",
]


def check_finite(name: str, t: torch.Tensor | None) -> None:
    r"""
    Args:
        name (`str`): the argument name used in the error.
        t (`torch.Tensor`, *optional*): the tensor to check; `None` passes.

    Raises:
        `ValueError`: `t` holds a NaN or an infinity.
    """
    if t is not None and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "an infinite value"
        raise ValueError(f"`{name}` contains {bad}")


def check_nonnegative(name: str, t: torch.Tensor | None) -> None:
    r"""
    Args:
        name (`str`): the argument name used in the error.
        t (`torch.Tensor`, *optional*): a variance; `None` passes.

    Raises:
        `ValueError`: `t` holds a NaN, an infinity or a negative entry.
    """
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
    r"""
    One affine sampler step x' = a·x + b·ε + c·z on per-element moments (docs/MATH.md §2).

    Args:
        mean_x (`torch.Tensor`):
            E[x], any shape, e.g. `(batch_size, channels, height, width)`.
        var_x (`torch.Tensor`):
            Var[x], the shape, dtype and device of `mean_x` (as are all tensors below).
        eps_mean (`torch.Tensor`):
            E[ε].
        eps_var (`torch.Tensor`, *optional*):
            Var[ε]; zero when not given.
        cov_x_eps (`torch.Tensor`, *optional*):
            Cov(x, ε); zero when not given.
        a (`float`):
            The step's coefficient of x.
        b (`float`):
            The step's coefficient of ε.
        c2 (`float`, *optional*, defaults to 0.0):
            The variance c² of the step's fresh noise.
        clamp (`bool`, *optional*, defaults to `True`):
            Clamp the new variance at 0 (a NaN stays a NaN): a noisy Monte Carlo covariance, or a
            negative `var_x`/`eps_var`, can push the sum below 0. `False` returns the raw sum.
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(mean_next, var_next)` of `mean_x`'s shape, contiguous, float32 for
        16-bit inputs and otherwise of the input dtype: `mean_next = a·mean_x + b·eps_mean`,
        `var_next = a²·var_x + 2ab·cov_x_eps + b²·eps_var + c2`.
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
    r"""
    The moments of ε_t from S Monte Carlo samples of x_t, in one pass (docs/MATH.md §2).

    Args:
        x (`torch.Tensor` of shape `(num_samples, *shape)`):
            The samples x^i.
        eps_mean (`torch.Tensor` of shape `(num_samples, *shape)`):
            The head's mean m^i at each sample.
        eps_var (`torch.Tensor` of shape `(num_samples, *shape)`, *optional*):
            The head's variance γ²^i at each sample; zero when not given.
        mean_x (`torch.Tensor` of shape `shape`):
            E[x_t], about which the covariance is taken.
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(e_eps, var_eps, cov_x_eps)`, each of shape `shape`:
        mean_i m^i, mean_i γ²^i + the population variance of the m^i (clamped at 0: only a negative
        `eps_var` can make it negative), and
        mean_i x^i·m^i − mean_x·mean_i m^i. float32 for 16-bit inputs, otherwise the input dtype.
    """
    if check_values:
        _check_values(finite={"x": x, "eps_mean": eps_mean, "mean_x": mean_x}, variances={"eps_var": eps_var})
    return torch.ops.bayesdiff_ext.mc_moments(x, eps_mean, eps_var, mean_x)


def mc_moment_step(
    x: torch.Tensor,
    eps_mean: torch.Tensor,
    eps_var: torch.Tensor | None,
    mean_x: torch.Tensor,
    var_x: torch.Tensor,
    *,
    a: float,
    b: float,
    c2: float = 0.0,
    clamp: bool = True,
    check_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    A Monte Carlo step of the moment recurrence in one pass over the samples (docs/MATH.md §2):
    :func:`mc_moments` then :func:`moment_step`, without writing E[ε] and Cov(x, ε) to memory.

    Args:
        x, eps_mean, eps_var, mean_x:
            The samples x^i of shape `(num_samples, *shape)`, the head's mean m^i and variance γ²^i at
            each (`eps_var` optional) and E[x] of shape `shape`, as for :func:`mc_moments`.
        var_x (`torch.Tensor` of shape `shape`):
            Var[x].
        a, b, c2, clamp:
            The step's coefficients of x and ε, its fresh noise's variance c² (defaults to 0.0) and
            whether to clamp the new variance at 0 (defaults to `True`), as for :func:`moment_step`.
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: `(mean_next, var_next, var_eps)`, each of shape
        `shape`: what `moment_step(mean_x, var_x, *mc_moments(x, eps_mean, eps_var, mean_x), a=a, b=b,
        c2=c2, clamp=clamp)` returns, and the `var_eps` of :func:`mc_moments`. float32 for 16-bit inputs,
        otherwise the input dtype.
    """
    if check_values:
        _check_values(
            finite={"x": x, "eps_mean": eps_mean, "mean_x": mean_x},
            variances={"eps_var": eps_var, "var_x": var_x},
        )
    return torch.ops.bayesdiff_ext.mc_moment_step(
        x, eps_mean, eps_var, mean_x, var_x, float(a), float(b), float(c2), bool(clamp)
    )


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
    r"""
    The diagonal GGN of ½‖f − y‖² for the weight of a Conv2d head (groups=1), summed over a batch
    (docs/MATH.md §1.2). The batch is never unfolded into patches.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The head's input.
        kernel_size (`int` or `tuple[int, int]`):
            The head's kernel size (kh, kw).
        stride, padding, dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1, 0, 1):
            The head's geometry, as `nn.Conv2d` takes it (zero padding).

    Returns:
        `torch.Tensor` of shape `(in_channels, kh, kw)`: h[j] = Σ_n Σ_p φ_{n,p}[j]², φ_{n,p} the zero-padded
        im2col patch of output position p of image n; float64 for float64 `phi`, otherwise float32. The GGN
        diagonal of `weight[c]` is h for every output channel c, that of the bias N·H_out·W_out (laplace-torch's
        `DiagLaplace.H` for BackPackGGN and CurvlinopsGGN). Sum over batches by adding the results.
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
    r"""
    The diagonal empirical Fisher of ½‖f − y‖² for a Conv2d head (groups=1), from per-image gradients
    (docs/MATH.md §1.2). The batch is never unfolded into patches.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The head's input.
        residual (`torch.Tensor` of shape `(batch_size, channels, height_out, width_out)`):
            f − y, the dtype and device of `phi`.
        kernel_size (`int` or `tuple[int, int]`):
            The head's kernel size (kh, kw).
        stride, padding, dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1, 0, 1):
            The head's geometry, as `nn.Conv2d` takes it (zero padding).
        with_bias (`bool`, *optional*, defaults to `False`):
            Also return the bias part.

    Returns:
        `torch.Tensor` of shape `(channels, in_channels, kh, kw)`: Σ_n (Σ_p r_n[c,p]·φ_{n,p}[j])², float64 for
        float64 inputs, otherwise float32; with `with_bias=True` a tuple with the bias part `(channels,)`,
        Σ_n (Σ_p r_n[c,p])². laplace-torch's BackPackEF and CurvlinopsEF return exactly 2× both parts (they square
        gradients of the sum of squares without the ½); BayesDiff's fit uses that form: multiply by 2 for parity.
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
    r"""
    The Gram matrix of the bias-augmented patches of a Conv2d head's input (groups=1): the exact last-layer GGN
    of ½‖f − y‖² is I_C ⊗ A_aug on per-channel blocks [W_c; b_c] (docs/MATH.md §1.1). The batch is never
    unfolded into patches.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The head's input.
        kernel_size (`int` or `tuple[int, int]`):
            The head's kernel size (kh, kw).
        stride, padding, dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1, 0, 1):
            The head's geometry, as `nn.Conv2d` takes it (zero padding).

    Returns:
        `torch.Tensor` of shape `(D + 1, D + 1)`, D = in_channels·kh·kw: A_aug = Σ_n Σ_p [φ_{n,p}; 1][φ_{n,p}; 1]ᵀ,
        rows in `weight.flatten(1)` order and the bias "1" last (A_aug[D, D] = N·H_out·W_out); float64 for
        float64 `phi`, otherwise float32. `bayesdiff_ext.posterior.curvature_layout` converts it to
        laplace-torch's parameter order and KFAC factors.
    """
    return torch.ops.bayesdiff_ext.conv_patch_gram(
        phi, *_patch_geometry(kernel_size, stride, padding, dilation)
    )


def linear_diag_ggn(phi: torch.Tensor) -> torch.Tensor:
    r"""
    The diagonal GGN of ½‖f − y‖² for the weight of a Linear head, summed over every row of `phi`
    (docs/MATH.md §1.2; tokens as rows, §8), accumulated in float64 without a float64 copy of
    `phi`.

    Args:
        phi (`torch.Tensor` of shape `(..., in_features)`):
            The head's input, e.g. `(batch_size, num_tokens, in_features)`.

    Returns:
        `torch.Tensor` of shape `(in_features,)`, float64 for every input dtype: h[j] = Σ_rows φ[j]², the GGN
        diagonal of `weight[c]` for every output c (that of the bias is the number of rows).
    """
    return torch.ops.bayesdiff_ext.linear_diag_ggn(phi)


def linear_diag_ef(
    phi: torch.Tensor, residual: torch.Tensor, *, with_bias: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""
    The diagonal empirical Fisher of ½‖f − y‖² for a Linear head, from per-sample gradients
    (docs/MATH.md §1.2; a sample is an image with all of its tokens, §8). No per-token Jacobian and
    no float64 copy of `phi` is formed.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, ..., in_features)`):
            The head's input; a sample is one leading index (an image), and every row under it (its
            tokens) adds to that sample's gradient.
        residual (`torch.Tensor` of shape `(batch_size, ..., channels)`):
            f − y at the same rows, same dtype and device as `phi`.
        with_bias (`bool`, *optional*, defaults to `False`):
            Also return the bias part.

    Returns:
        The weight part, `torch.Tensor` of shape `(channels, in_features)`: Σ_n (Σ_t r[n, t, c]·φ[n, t, j])²;
        with `with_bias=True` the tuple `(weight part, bias part)`, the bias part of shape `(channels,)`:
        Σ_n (Σ_t r[n, t, c])². float64 for every input dtype. As for `conv_diag_ef`, laplace-torch's EF
        backends give 2× both parts.
    """
    augmented = torch.ops.bayesdiff_ext.linear_diag_ef(phi, residual)  # (C, D + 1), the bias column last
    weight_part = augmented[:, :-1]
    return (weight_part, augmented[:, -1]) if with_bias else weight_part


def linear_gram(phi: torch.Tensor) -> torch.Tensor:
    r"""
    The Gram matrix of the bias-augmented rows of a Linear head's input: the exact last-layer GGN of
    ½‖f − y‖² is I_C ⊗ A_aug on per-output blocks [W_c; b_c] (docs/MATH.md §1.1, §8), as for
    `conv_patch_gram`.
    Accumulated in float64, tile by tile, without a float64 copy of `phi`.

    Args:
        phi (`torch.Tensor` of shape `(..., in_features)`):
            The head's input, e.g. `(batch_size, num_tokens, in_features)`.

    Returns:
        `torch.Tensor` of shape `(D + 1, D + 1)`, D = in_features, float64 for every input dtype:
        A_aug = Σ_rows [φ; 1][φ; 1]ᵀ, the bias "1" last (A_aug[D, D] = the number of rows).
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
    r"""
    The mean and variance of a Conv2d head's output under a diagonal weight posterior (docs/MATH.md §1.1), both
    from one pass over `phi`.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The head's input.
        weight (`torch.Tensor` of shape `(channels, in_channels // groups, kh, kw)`):
            The posterior mean of the weight, as in `nn.Conv2d`.
        bias (`torch.Tensor` of shape `(channels,)`, *optional*):
            The posterior mean of the bias; zero when not given.
        weight_var (`torch.Tensor` of the shape of `weight`):
            The weight's posterior variances (required).
        bias_var (`torch.Tensor` of shape `(channels,)`, *optional*):
            The bias's posterior variances; zero when not given.
        stride, padding, dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1, 0, 1):
            The head's geometry, as `nn.Conv2d` takes it (zero padding).
        groups (`int`, *optional*, defaults to 1):
            The head's groups.
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(mean, var)`, each of shape `(batch_size, channels, height_out,
        width_out)`, contiguous, float32 for 16-bit inputs and otherwise of the input dtype:
        `mean = conv2d(phi, weight, bias)`, `var = max(conv2d(phi², weight_var, bias_var), 0)` (negative
        variances in are not checked here; see the module docstring).
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
    r"""
    The mean and variance of a Linear head's output under a diagonal weight posterior (docs/MATH.md §1.1).

    Args:
        phi (`torch.Tensor` of shape `(..., in_features)`):
            The head's input.
        weight (`torch.Tensor` of shape `(channels, in_features)`):
            The posterior mean of the weight.
        bias (`torch.Tensor` of shape `(channels,)`, *optional*):
            The posterior mean of the bias; zero when not given.
        weight_var (`torch.Tensor` of shape `(channels, in_features)`):
            The weight's posterior variances (required).
        bias_var (`torch.Tensor` of shape `(channels,)`, *optional*):
            The bias's posterior variances; zero when not given.
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(mean, var)`, each of shape `(..., channels)`:
        `phi @ weight.T + bias` and `max(phi² @ weight_var.T + bias_var, 0)`, float32 for 16-bit inputs and
        otherwise of the input dtype.
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
    r"""
    The per-pixel variance of a Conv2d head (groups=1) under a factored posterior, full GGN or KFAC
    ("project–square–mix", docs/MATH.md §1.1). The `(batch_size, R, height_out, width_out)` projection is
    never formed whole: the kernels work through tiles of pixels.

    Args:
        phi (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The head's input.
        proj_weight (`torch.Tensor` of shape `(R, in_channels, kh, kw)`):
            R directions q_r as conv filters.
        proj_bias (`torch.Tensor` of shape `(R,)`, *optional*):
            Their offsets β_r; zero when `None`.
        mix (`torch.Tensor` of shape `(channels, R)`):
            The non-negative weight of each squared projection in each output channel's variance.
        bias_var (`torch.Tensor` of shape `(channels,)`, *optional*):
            A per-channel variance added at every pixel; zero when not given.
        stride, padding, dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1, 0, 1):
            The head's geometry, as `nn.Conv2d` takes it (zero padding).
        check_values (`bool`, *optional*, defaults to `False`):
            Also check for NaN/inf and negative variances (an extra pass; see the module docstring).

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, height_out, width_out)`:
        `var[b, c, p] = max(Σ_r mix[c, r]·(conv2d(phi, proj_weight, proj_bias)[b, r, p])² + bias_var[c], 0)`
        (a negative `mix` or `bias_var` is not checked here), float32 for 16-bit inputs and otherwise of the
        input dtype. `bayesdiff_ext.posterior.laplace_convert` builds the
        inputs from a laplace-torch posterior.
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

"""Fake (meta) implementations of the ops, so that torch.compile and export can trace them.

They are registered for every namespace that carries the schemas: the real library and the
host emulation of the CUDA kernels used by the tests. Each checks the same shape, dtype, device
and scalar rules as the op's C++ glue (csrc/glue/*_args.cpp), so that a traced program fails where
an eager one would; tests/test_op_fuzz.py holds them to that on random arguments.
"""

import math

import torch

from bayesdiff_ext.numerics import accumulation_dtype

_FLOATING_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating(name: str, t) -> None:
    torch._check(
        t.dtype in _FLOATING_TYPES,
        lambda: f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )


def _check_same(name: str, t, ref, ref_name: str, shape) -> None:
    if t is None:
        return
    torch._check(
        t.device == ref.device,
        lambda: f"`{name}` is on {t.device} but `{ref_name}` is on {ref.device}; all tensors must be on one device",
    )
    torch._check(t.dtype == ref.dtype, lambda: f"`{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}")
    torch._check(tuple(t.shape) == tuple(shape), lambda: f"`{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_pair(values, name: str, minimum: int) -> None:
    torch._check(len(values) == 2, lambda: f"`{name}` must have 2 entries (height, width), got {list(values)}")
    torch._check(min(values) >= minimum, lambda: f"`{name}` must be >= {minimum}, got {list(values)}")


def _check_stride_padding_dilation(stride, padding, dilation) -> None:
    _check_pair(stride, "stride", 1)
    _check_pair(padding, "padding", 0)
    _check_pair(dilation, "dilation", 1)


def _check_features(phi) -> None:
    _check_floating("phi", phi)
    torch._check(phi.dim() == 4, lambda: f"`phi` must have shape (N, C_in, H, W), got {tuple(phi.shape)}")


def _conv_output_size(phi, kernel_size, stride, padding, dilation) -> tuple:
    """(H_out, W_out) of a conv over `phi` (checked as (N, C_in, H, W)); at least 1×1."""
    _check_features(phi)
    _check_pair(kernel_size, "kernel_size", 1)
    _check_stride_padding_dilation(stride, padding, dilation)
    room = [phi.shape[2 + k] + 2 * padding[k] - dilation[k] * (kernel_size[k] - 1) - 1 for k in range(2)]
    torch._check(
        min(room) >= 0,
        lambda: f"the {tuple(kernel_size)} kernel with dilation {tuple(dilation)} does not fit `phi` of spatial "
        f"size {tuple(phi.shape[2:])} with padding {tuple(padding)}",
    )
    return tuple(r // s + 1 for r, s in zip(room, stride))


def _patch_output_size(phi, kernel_size, stride, padding, dilation) -> tuple:
    """`_conv_output_size` for the curvature ops, whose patches need at least one input channel (checked
    before the geometry, as csrc/glue/curvature_args.cpp does)."""
    _check_features(phi)
    torch._check_value(
        phi.shape[1] >= 1, lambda: f"`phi` must have at least one channel (C_in >= 1), got shape {tuple(phi.shape)}"
    )
    return _conv_output_size(phi, kernel_size, stride, padding, dilation)


def _check_conv_weight(name: str, weight, phi) -> None:
    _check_same(name, weight, phi, "phi", weight.shape)
    torch._check(weight.dim() == 4, lambda: f"`{name}` must be a conv weight (C, C_in, kh, kw), got {tuple(weight.shape)}")


def _check_step_scalars(a, b, c2) -> None:
    for name, value in (("a", a), ("b", b), ("c2", c2)):
        torch._check(math.isfinite(value), lambda: f"`{name}` must be finite, got {value}")
    torch._check(c2 >= 0, lambda: f"`c2` is the variance of the fresh noise and must be >= 0, got {c2}")


def _check_samples(x, eps_mean, eps_var, mean_x) -> None:
    """The (S, ...) stacks of Monte Carlo samples and E[x] of shape (...)."""
    _check_floating("x", x)
    torch._check(x.dim() >= 1, lambda: "`x` must be a stack of Monte Carlo samples with shape (S, ...)")
    torch._check(x.shape[0] >= 1, lambda: "`x` must hold at least one sample (S >= 1), got S = 0")
    _check_same("eps_mean", eps_mean, x, "x", x.shape)
    _check_same("eps_var", eps_var, x, "x", x.shape)
    _check_same("mean_x", mean_x, x, "x", x.shape[1:])


def _results(like, count: int) -> tuple:
    """``count`` new tensors of ``like``'s shape in the dtype every op returns."""
    dtype = accumulation_dtype(like.dtype)
    return tuple(like.new_empty(like.shape, dtype=dtype) for _ in range(count))


def register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::moment_step")
    def _moment_step_fake(mean_x, var_x, eps_mean, eps_var, cov_x_eps, a, b, c2, clamp=True):
        _check_floating("mean_x", mean_x)
        for name, t in (("var_x", var_x), ("eps_mean", eps_mean), ("eps_var", eps_var), ("cov_x_eps", cov_x_eps)):
            _check_same(name, t, mean_x, "mean_x", mean_x.shape)
        _check_step_scalars(a, b, c2)
        return _results(mean_x, 2)

    @torch.library.register_fake(f"{namespace}::mc_moments")
    def _mc_moments_fake(x, eps_mean, eps_var, mean_x):
        _check_samples(x, eps_mean, eps_var, mean_x)
        return _results(mean_x, 3)

    @torch.library.register_fake(f"{namespace}::mc_moment_step")
    def _mc_moment_step_fake(x, eps_mean, eps_var, mean_x, var_x, a, b, c2, clamp=True):
        _check_samples(x, eps_mean, eps_var, mean_x)
        _check_same("var_x", var_x, x, "x", x.shape[1:])
        _check_step_scalars(a, b, c2)
        return _results(mean_x, 3)

    @torch.library.register_fake(f"{namespace}::conv_diag_ggn")
    def _conv_diag_ggn_fake(phi, kernel_size, stride, padding, dilation):
        _patch_output_size(phi, kernel_size, stride, padding, dilation)
        return phi.new_empty((phi.shape[1], *kernel_size), dtype=accumulation_dtype(phi.dtype))

    @torch.library.register_fake(f"{namespace}::conv_diag_ef")
    def _conv_diag_ef_fake(phi, residual, kernel_size, stride, padding, dilation):
        out_h, out_w = _patch_output_size(phi, kernel_size, stride, padding, dilation)
        torch._check(residual.dim() == 4, lambda: "`residual` must have shape (N, C, H_out, W_out)")
        _check_same("residual", residual, phi, "phi", (phi.shape[0], residual.shape[1], out_h, out_w))
        return phi.new_empty((residual.shape[1], phi.shape[1], *kernel_size), dtype=accumulation_dtype(phi.dtype))

    @torch.library.register_fake(f"{namespace}::conv_patch_gram")
    def _conv_patch_gram_fake(phi, kernel_size, stride, padding, dilation):
        _patch_output_size(phi, kernel_size, stride, padding, dilation)
        augmented = phi.shape[1] * kernel_size[0] * kernel_size[1] + 1
        return phi.new_empty((augmented, augmented), dtype=accumulation_dtype(phi.dtype))

    @torch.library.register_fake(f"{namespace}::linear_diag_ggn")
    def _linear_diag_ggn_fake(phi):
        _check_floating("phi", phi)
        torch._check(phi.dim() >= 1, lambda: "`phi` must have shape (..., D)")
        return phi.new_empty((phi.shape[-1],), dtype=torch.float64)

    @torch.library.register_fake(f"{namespace}::linear_diag_ef")
    def _linear_diag_ef_fake(phi, residual):
        _check_floating("phi", phi)
        torch._check(phi.dim() >= 2, lambda: "`phi` must have shape (N, ..., D) with a leading sample dim")
        torch._check(residual.dim() == phi.dim(), lambda: "`residual` must have shape (N, ..., C) like `phi`")
        _check_same("residual", residual, phi, "phi", (*phi.shape[:-1], residual.shape[-1]))
        return phi.new_empty((residual.shape[-1], phi.shape[-1] + 1), dtype=torch.float64)

    @torch.library.register_fake(f"{namespace}::linear_gram")
    def _linear_gram_fake(phi):
        _check_floating("phi", phi)
        torch._check(phi.dim() >= 1, lambda: "`phi` must have shape (..., D)")
        augmented = phi.shape[-1] + 1
        return phi.new_empty((augmented, augmented), dtype=torch.float64)

    @torch.library.register_fake(f"{namespace}::conv_head_mean_var")
    def _conv_head_mean_var_fake(phi, weight, bias, weight_var, bias_var, stride, padding, dilation, groups):
        _check_features(phi)
        _check_conv_weight("weight", weight, phi)
        torch._check(groups >= 1, lambda: f"`groups` must be >= 1, got {groups}")
        torch._check(weight.shape[0] % groups == 0, lambda: "`weight`'s output channels are not divisible by groups")
        torch._check(weight.shape[1] * groups == phi.shape[1], lambda: "`weight` does not match the channels of `phi`")
        _check_same("weight_var", weight_var, phi, "phi", weight.shape)
        _check_same("bias", bias, phi, "phi", weight.shape[:1])
        _check_same("bias_var", bias_var, phi, "phi", weight.shape[:1])
        out_h, out_w = _conv_output_size(phi, weight.shape[2:], stride, padding, dilation)
        shape = (phi.shape[0], weight.shape[0], out_h, out_w)
        dtype = accumulation_dtype(phi.dtype)
        return phi.new_empty(shape, dtype=dtype), phi.new_empty(shape, dtype=dtype)

    @torch.library.register_fake(f"{namespace}::linear_head_mean_var")
    def _linear_head_mean_var_fake(phi, weight, bias, weight_var, bias_var):
        _check_floating("phi", phi)
        torch._check(phi.dim() >= 1, lambda: "`phi` must have shape (..., D)")
        torch._check(weight.dim() == 2, lambda: "`weight` must be a Linear weight (C, D)")
        _check_same("weight", weight, phi, "phi", (weight.shape[0], phi.shape[-1]))
        _check_same("weight_var", weight_var, phi, "phi", weight.shape)
        _check_same("bias", bias, phi, "phi", weight.shape[:1])
        _check_same("bias_var", bias_var, phi, "phi", weight.shape[:1])
        shape = (*phi.shape[:-1], weight.shape[0])
        dtype = accumulation_dtype(phi.dtype)
        return phi.new_empty(shape, dtype=dtype), phi.new_empty(shape, dtype=dtype)

    @torch.library.register_fake(f"{namespace}::conv_head_var_factored")
    def _conv_head_var_factored_fake(phi, proj_weight, proj_bias, mix, bias_var, stride, padding, dilation):
        _check_features(phi)
        _check_conv_weight("proj_weight", proj_weight, phi)
        rank = proj_weight.shape[0]
        torch._check(proj_weight.shape[1] == phi.shape[1], lambda: "`proj_weight` does not match the channels of `phi`")
        torch._check(mix.dim() == 2, lambda: "`mix` must have shape (C, R)")
        _check_same("mix", mix, phi, "phi", (mix.shape[0], rank))
        out_h, out_w = _conv_output_size(phi, proj_weight.shape[2:], stride, padding, dilation)
        _check_same("proj_bias", proj_bias, phi, "phi", (rank,))
        _check_same("bias_var", bias_var, phi, "phi", mix.shape[:1])
        return phi.new_empty((phi.shape[0], mix.shape[0], out_h, out_w), dtype=accumulation_dtype(phi.dtype))

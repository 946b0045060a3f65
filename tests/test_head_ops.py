"""conv_head_mean_var, linear_head_mean_var and conv_head_var_factored: every backend against the
float64 reference, opcheck, torch.compile, and errors that name the argument."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bayesdiff_ext import emulation, ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative error allowed against Σ|terms| (the scale of the rounding of a sum): float32
# accumulation for every dtype but float64. 16-bit inputs are exact in float32.
TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 2e-6, torch.bfloat16: 2e-6}


@dataclass(frozen=True)
class Conv:
    batch: int
    in_channels: int
    channels: int
    height: int
    width: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    with_bias: bool = True

    @property
    def geometry(self):
        return [list(self.stride), list(self.padding), list(self.dilation)]


CONV_CASES = {
    "batch1-3x3-pad1-odd": Conv(1, 3, 2, 7, 9, (3, 3), padding=(1, 1)),
    "1x1-no-bias": Conv(2, 5, 3, 17, 13, (1, 1), with_bias=False),
    "stride2-groups2-pad0": Conv(2, 4, 6, 17, 13, (3, 3), stride=(2, 2), groups=2),
    "dilation2-groups2": Conv(3, 6, 4, 9, 11, (3, 3), padding=(2, 2), dilation=(2, 2), groups=2, with_bias=False),
    "many-channels-wide-rows": Conv(2, 8, 9, 5, 37, (3, 3), padding=(1, 1)),
    "general-kernel": Conv(2, 3, 5, 8, 19, (2, 5), stride=(1, 2), padding=(0, 3), dilation=(2, 1)),
    "padding-wider-than-image": Conv(1, 2, 3, 3, 4, (3, 3), padding=(4, 5)),
}


def _rand(shape, dtype, device, positive=False, scale=1.0):
    t = torch.randn(shape, dtype=torch.float64) * scale
    if positive:
        t = t.abs()
    return t.to(dtype=dtype, device=device)


def _conv_inputs(case: Conv, dtype, device):
    phi = _rand((case.batch, case.in_channels, case.height, case.width), dtype, device)
    w_shape = (case.channels, case.in_channels // case.groups, *case.kernel)
    weight = _rand(w_shape, dtype, device, scale=0.5)
    weight_var = _rand(w_shape, dtype, device, positive=True, scale=0.1)
    bias = _rand((case.channels,), dtype, device) if case.with_bias else None
    bias_var = _rand((case.channels,), dtype, device, positive=True) if case.with_bias else None
    return phi, weight, bias, weight_var, bias_var


def _assert_within(actual, expected, bound, dtype):
    """|actual − expected| <= tol·bound elementwise, bound = Σ|terms| of each output."""
    actual = actual.cpu().double()
    err = (actual - expected).abs()
    allowed = TOL[dtype] * bound + 1e-300
    worst = (err / allowed).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the tolerance"


def _diag_bounds(phi, weight, bias, weight_var, bias_var, case: Conv):
    abs64 = [None if t is None else t.double().abs() for t in (phi, weight, bias, weight_var, bias_var)]
    return reference.conv_head_mean_var(*abs64, *case.geometry, case.groups)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_head_mean_var_matches_reference(backend, case, dtype):
    args = _conv_inputs(case, dtype, backend.device)
    mean, var = backend.ops.conv_head_mean_var(*args, *case.geometry, case.groups)
    ref_mean, ref_var = reference.conv_head_mean_var(*args, *case.geometry, case.groups)
    bound_mean, bound_var = _diag_bounds(*args, case)
    for out, ref, bound in ((mean, ref_mean, bound_mean), (var, ref_var, bound_var)):
        assert out.shape == ref.shape and out.dtype == ops.result_dtype(dtype) and out.is_contiguous()
        _assert_within(out, ref, bound, dtype)
    assert (var >= 0).all()


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "sliced", "transposed_weights"],
)
def test_conv_head_mean_var_non_contiguous(backend, layout):
    case = CONV_CASES["batch1-3x3-pad1-odd"]
    phi, weight, bias, weight_var, bias_var = _conv_inputs(Conv(3, 6, 4, 11, 14, (3, 3), padding=(1, 1)), torch.float32, backend.device)
    if layout == "channels_last":
        phi = phi.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        phi, weight, weight_var = phi[:, 1::2, :, 1:-2], weight[:, 1::2], weight_var[:, 1::2]
    else:
        weight, weight_var = weight.transpose(2, 3), weight_var.transpose(2, 3)
    assert not (phi.is_contiguous() and weight.is_contiguous())
    out = backend.ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 1)
    ref = reference.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 1)
    bounds = _diag_bounds(phi, weight, bias, weight_var, bias_var, case)
    for o, r, b in zip(out, ref, bounds):
        assert o.is_contiguous()
        _assert_within(o, r, b, torch.float32)


def test_conv_head_mean_var_empty_batch(backend):
    case = CONV_CASES["batch1-3x3-pad1-odd"]
    phi, *params = _conv_inputs(case, torch.float32, backend.device)
    mean, var = backend.ops.conv_head_mean_var(phi[:0], *params, *case.geometry, 1)
    assert mean.shape == var.shape == (0, case.channels, case.height, case.width)


@dataclass(frozen=True)
class Factored:
    conv: Conv
    rank: int
    with_proj_bias: bool = True


FACTORED_CASES = {
    "batch1-rank1": Factored(Conv(1, 3, 2, 7, 9, (3, 3), padding=(1, 1)), rank=1),
    "rank-over-a-chunk-no-biases": Factored(Conv(2, 2, 3, 6, 11, (3, 3), padding=(1, 1), with_bias=False), 17, False),
    "full-rank-D+1": Factored(Conv(2, 3, 4, 9, 7, (3, 3), padding=(1, 1)), rank=28),
    "stride2-dilation2-pad0": Factored(Conv(1, 4, 3, 17, 13, (3, 3), stride=(2, 2), dilation=(2, 2)), rank=9),
    "1x1-many-channels": Factored(Conv(2, 5, 9, 5, 37, (1, 1)), rank=6),
    # A Linear head on rows (B, D, 1, 1), as posterior/head_ops.py calls it: the CPU's row tiles.
    "rows-of-features": Factored(Conv(37, 9, 5, 1, 1, (1, 1)), rank=20),
    "rows-of-features-no-biases": Factored(Conv(3, 4, 2, 1, 1, (1, 1), with_bias=False), rank=5, with_proj_bias=False),
}


def _factored_inputs(case: Factored, dtype, device):
    c = case.conv
    phi = _rand((c.batch, c.in_channels, c.height, c.width), dtype, device)
    proj_weight = _rand((case.rank, c.in_channels, *c.kernel), dtype, device, scale=0.5)
    proj_bias = _rand((case.rank,), dtype, device) if case.with_proj_bias else None
    mix = _rand((c.channels, case.rank), dtype, device, positive=True)
    bias_var = _rand((c.channels,), dtype, device, positive=True) if c.with_bias else None
    return phi, proj_weight, proj_bias, mix, bias_var


def _factored_bound(phi, proj_weight, proj_bias, mix, bias_var, geometry):
    abs64 = [None if t is None else t.double().abs() for t in (phi, proj_weight, proj_bias, mix, bias_var)]
    # Rounding of the projection is relative to Σ|q||φ|; squaring doubles it.
    return 2 * reference.conv_head_var_factored(*abs64, *geometry)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FACTORED_CASES.values(), ids=FACTORED_CASES.keys())
def test_conv_head_var_factored_matches_reference(backend, case, dtype):
    args = _factored_inputs(case, dtype, backend.device)
    var = backend.ops.conv_head_var_factored(*args, *case.conv.geometry)
    ref = reference.conv_head_var_factored(*args, *case.conv.geometry)
    assert var.shape == ref.shape and var.dtype == ops.result_dtype(dtype) and var.is_contiguous()
    _assert_within(var, ref, _factored_bound(*args, case.conv.geometry), dtype)
    assert (var >= 0).all()


def test_conv_head_var_factored_non_contiguous(backend):
    case = FACTORED_CASES["full-rank-D+1"]
    phi, proj_weight, proj_bias, mix, bias_var = _factored_inputs(case, torch.float32, backend.device)
    phi = phi.contiguous(memory_format=torch.channels_last)[..., 1:]
    mix = mix.t().contiguous().t()
    assert not phi.is_contiguous() and not mix.is_contiguous()
    var = backend.ops.conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, *case.conv.geometry)
    ref = reference.conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, *case.conv.geometry)
    bound = _factored_bound(phi, proj_weight, proj_bias, mix, bias_var, case.conv.geometry)
    _assert_within(var, ref, bound, torch.float32)


def test_conv_head_var_factored_spans_several_tiles(backend):
    """Many directions make the CPU kernel split an image into tiles of whole rows (its tiles are
    bounded in bytes: 32 MiB of patches and projections), including a shorter last tile."""
    phi = _rand((2, 1, 24, 50), torch.float64, backend.device)
    proj_weight = _rand((4100, 1, 3, 3), torch.float64, backend.device, scale=0.3)
    proj_bias = _rand((4100,), torch.float64, backend.device)
    mix = _rand((3, 4100), torch.float64, backend.device, positive=True)
    args = (phi, proj_weight, proj_bias, mix, None, [1, 1], [1, 1], [1, 1])
    var = backend.ops.conv_head_var_factored(*args)
    _assert_within(var, reference.conv_head_var_factored(*args), _factored_bound(*args[:5], args[5:]), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, threads", [(37, 2), (53, 2), (53, 1)], ids=["2-bands-a-thread", "4-bands-a-thread", "8-bands"])
def test_conv_head_var_factored_cpu_thread_bands(rows, threads, dtype):
    """A tile of ≥ 2·256 pixels (here 41 wide) is split into bands of rows of at least 256 pixels,
    the same number for each thread (37 rows at 2 threads: 4 bands of 9–10 rows; 53 rows at 1 or 2
    threads: 8 bands of 6–7), each gathered, projected and mixed on its own; the result must not
    depend on it."""
    case = Factored(Conv(2, 3, 4, rows, 41, (3, 3), padding=(1, 1)), rank=28)
    args = _factored_inputs(case, dtype, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        var = torch.ops.bayesdiff_ext.conv_head_var_factored(*args, *case.conv.geometry)
    finally:
        torch.set_num_threads(before)
    ref = reference.conv_head_var_factored(*args, *case.conv.geometry)
    _assert_within(var, ref, _factored_bound(*args, case.conv.geometry), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [((2, 1, 97, 50), (3, 3), (1, 1), (1, 1), (1, 1)), ((1, 2, 260, 40), (3, 2), (2, 1), (2, 1), (2, 2))],
    ids=["3x3-pad1", "3x2-stride2-dilation2"],
)
def test_conv_head_var_factored_cpu_convolution_tiles(shape, kernel, stride, padding, dilation, dtype):
    """An image that takes more than two tiles goes through the convolution of each tile's input rows
    on the CPU (the first and last tiles reach into the vertical padding) instead of its patches."""
    phi = _rand(shape, dtype, "cpu")
    proj_weight = _rand((4100, shape[1], *kernel), dtype, "cpu", scale=0.3)
    proj_bias = _rand((4100,), dtype, "cpu")
    mix = _rand((3, 4100), dtype, "cpu", positive=True)
    args = (phi, proj_weight, proj_bias, mix, None, list(stride), list(padding), list(dilation))
    var = torch.ops.bayesdiff_ext.conv_head_var_factored(*args)
    _assert_within(var, reference.conv_head_var_factored(*args), _factored_bound(*args[:5], args[5:]), dtype)


@pytest.mark.parametrize(
    "rows, rank",
    [(1100, 8000), (300, 70000)],
    ids=["over-512-rows", "over-32MiB"],
)
def test_conv_head_var_factored_cpu_row_tiles(rows, rank):
    """Rows (B, D, 1, 1) in tiles of at most 512 rows and of at most 32 MiB of (2R + D)·4 B per row,
    spread evenly: 367, 367, 366 rows; 5 × 60 rows of 560 kB (the large R also checks the rounding
    of the mix, a float32 sum over R)."""
    case = Factored(Conv(rows, 4, 3, 1, 1, (1, 1)), rank=rank)
    args = _factored_inputs(case, torch.float32, "cpu")
    var = torch.ops.bayesdiff_ext.conv_head_var_factored(*args, *case.conv.geometry)
    bound = _factored_bound(*args, case.conv.geometry)
    _assert_within(var, reference.conv_head_var_factored(*args, *case.conv.geometry), bound, torch.float32)


def test_factored_with_unit_directions_is_the_diagonal_op(backend):
    """A diagonal posterior written in factored form (q_r = unit vectors, mix = V_w) gives the
    diagonal op's variance: the two kernels agree with each other, not only with the reference."""
    case = CONV_CASES["batch1-3x3-pad1-odd"]
    phi, weight, bias, weight_var, bias_var = _conv_inputs(case, torch.float64, backend.device)
    taps = weight[0].numel()
    directions = torch.eye(taps, dtype=torch.float64, device=backend.device).view(taps, *weight.shape[1:])
    factored = backend.ops.conv_head_var_factored(
        phi, directions, None, weight_var.flatten(1), bias_var, *case.geometry
    )
    _, diagonal = backend.ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 1)
    torch.testing.assert_close(factored, diagonal, rtol=1e-12, atol=1e-12)


LINEAR_SHAPES = {
    "rows-tail": ((5, 37), 3),
    "leading-dims": ((2, 3, 70), 9),
    "one-row-one-output": ((1, 16), 1),
    "vector": ((21,), 4),
    # From 16 outputs the CPU kernel runs two GEMMs on tiles of rows.
    "wide-head": ((2, 3, 70), 24),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, channels", LINEAR_SHAPES.values(), ids=LINEAR_SHAPES.keys())
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_head_mean_var_matches_reference(backend, shape, channels, dtype, with_bias):
    phi = _rand(shape, dtype, backend.device)
    weight = _rand((channels, shape[-1]), dtype, backend.device, scale=0.5)
    weight_var = _rand((channels, shape[-1]), dtype, backend.device, positive=True, scale=0.1)
    bias = _rand((channels,), dtype, backend.device) if with_bias else None
    bias_var = _rand((channels,), dtype, backend.device, positive=True) if with_bias else None
    args = (phi, weight, bias, weight_var, bias_var)
    mean, var = backend.ops.linear_head_mean_var(*args)
    ref_mean, ref_var = reference.linear_head_mean_var(*args)
    bound_mean, bound_var = reference.linear_head_mean_var(*[None if t is None else t.double().abs() for t in args])
    for out, ref, bound in ((mean, ref_mean, bound_mean), (var, ref_var, bound_var)):
        assert out.shape == (*shape[:-1], channels) and out.dtype == ops.result_dtype(dtype) and out.is_contiguous()
        _assert_within(out, ref, bound, dtype)
    assert (var >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_head_mean_var_cpu_tiles(dtype):
    """The CPU's wide-head path works through tiles of about 512 KiB of φ rows: several tiles, a
    short last one, and (at 2 threads) tiles split between threads."""
    phi = _rand((70, 2100), dtype, "cpu")
    weight = _rand((17, 2100), dtype, "cpu", scale=0.5)
    weight_var = _rand((17, 2100), dtype, "cpu", positive=True, scale=0.1)
    args = (phi, weight, _rand((17,), dtype, "cpu"), weight_var, _rand((17,), dtype, "cpu", positive=True))
    bounds = reference.linear_head_mean_var(*[t.double().abs() for t in args])
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for o, r, b in zip(torch.ops.bayesdiff_ext.linear_head_mean_var(*args), reference.linear_head_mean_var(*args), bounds):
                _assert_within(o, r, b, dtype)
    finally:
        torch.set_num_threads(previous)


def test_linear_head_mean_var_non_contiguous(backend):
    base = _rand((40, 6, 3), torch.float32, backend.device)
    phi = base.transpose(0, 2)[:, ::2]  # (3, 3, 40)
    weight = _rand((40, 5), torch.float32, backend.device).t()
    weight_var = weight.abs()
    assert not phi.is_contiguous() and not weight.is_contiguous()
    out = backend.ops.linear_head_mean_var(phi, weight, None, weight_var, None)
    ref = reference.linear_head_mean_var(phi, weight, None, weight_var, None)
    bounds = reference.linear_head_mean_var(phi.double().abs(), weight.double().abs(), None, weight_var.double(), None)
    for o, r, b in zip(out, ref, bounds):
        _assert_within(o, r, b, torch.float32)


def _conv_call(lib, kw):
    return lib.conv_head_mean_var(
        kw["phi"], kw["weight"], kw["bias"], kw["weight_var"], kw["bias_var"], kw["stride"], kw["padding"],
        kw["dilation"], kw["groups"],
    )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(phi=a["phi"][0]), "`phi` must be the head's input features"),
        (lambda a: a.update(phi=a["phi"].long()), "`phi` must be float16"),
        (lambda a: a.update(weight=a["weight"].double()), "`weight` has dtype"),
        (lambda a: a.update(weight=a["weight"][:, :2]), "`weight` expects 2 input channels"),
        (lambda a: a.update(weight_var=a["weight_var"][:, :, :2]), "`weight_var` must have shape"),
        (lambda a: a.update(bias=a["bias"][:3]), r"`bias` must have shape \(4,\)"),
        (lambda a: a.update(bias_var=a["bias_var"].half()), "`bias_var` has dtype"),
        (lambda a: a.update(groups=3), "not divisible by groups = 3"),
        (lambda a: a.update(groups=0), "`groups` must be >= 1"),
        (lambda a: a.update(stride=[0, 1]), "`stride` must be >= 1"),
        (lambda a: a.update(padding=[-1, 0]), "`padding` must be >= 0"),
        (lambda a: a.update(dilation=[1, 1, 1]), "`dilation` must have 2 entries"),
        (lambda a: a.update(padding=[0, 0], dilation=[4, 4]), "does not fit `phi`"),
        (lambda a: a.update(phi=a["phi"][..., :2, :2], padding=[0, 0], stride=[2, 2]), "does not fit `phi`"),
    ],
)
def test_conv_head_mean_var_errors_name_the_argument(backend, mutate, message):
    phi, weight, bias, weight_var, bias_var = _conv_inputs(Conv(2, 3, 4, 6, 7, (3, 3)), torch.float32, backend.device)
    kwargs = dict(phi=phi, weight=weight, bias=bias, weight_var=weight_var, bias_var=bias_var, stride=[1, 1],
                  padding=[1, 1], dilation=[1, 1], groups=1)
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        _conv_call(backend.ops, kwargs)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(proj_weight=a["proj_weight"][:, :2]), "`proj_weight` must hold R projection directions"),
        (lambda a: a.update(proj_bias=a["proj_bias"][:-1]), r"`proj_bias` must have shape \(5,\)"),
        (lambda a: a.update(mix=a["mix"][:, :-1]), r"`mix` must have shape \(C, R\) with R = 5"),
        (lambda a: a.update(mix=a["mix"].double()), "`mix` has dtype"),
        (lambda a: a.update(bias_var=a["bias_var"][:1]), r"`bias_var` must have shape \(2,\)"),
        (lambda a: a.update(phi=a["phi"][..., :1, :1]), "does not fit `phi`"),
    ],
)
def test_conv_head_var_factored_errors_name_the_argument(backend, mutate, message):
    case = Factored(Conv(2, 3, 2, 6, 7, (3, 3)), rank=5)
    names = ("phi", "proj_weight", "proj_bias", "mix", "bias_var")
    kwargs = dict(zip(names, _factored_inputs(case, torch.float32, backend.device)))
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.conv_head_var_factored(*(kwargs[n] for n in names), [1, 1], [0, 0], [1, 1])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), "`weight` must be a Linear weight"),
        (lambda a: a.update(weight_var=a["weight_var"][:2]), "`weight_var` must have shape"),
        (lambda a: a.update(bias=a["bias"].double()), "`bias` has dtype"),
        (lambda a: a.update(bias_var=a["bias_var"][None]), "`bias_var` must have shape"),
        (lambda a: a.update(phi=a["phi"].int()), "`phi` must be float16"),
    ],
)
def test_linear_head_mean_var_errors_name_the_argument(backend, mutate, message):
    d = backend.device
    kwargs = dict(phi=_rand((4, 6), torch.float32, d), weight=_rand((3, 6), torch.float32, d),
                  bias=_rand((3,), torch.float32, d), weight_var=_rand((3, 6), torch.float32, d, positive=True),
                  bias_var=_rand((3,), torch.float32, d, positive=True))
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.linear_head_mean_var(**kwargs)


def test_mixed_devices_are_named():
    phi, weight = torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3)
    meta = torch.empty(3, 2, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="`weight_var` is on meta"):
        torch.ops.bayesdiff_ext.conv_head_mean_var(phi, weight, None, meta, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="`mix` is on meta"):
        torch.ops.bayesdiff_ext.conv_head_var_factored(
            phi, weight, None, torch.empty(2, 3, device="meta"), None, [1, 1], [1, 1], [1, 1]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_negative_variances_give_clamped_outputs(backend, dtype):
    """Negative weight_var, bias_var or mix are not checked on the hot path (a host sync per call);
    every head op clamps the variance it returns at 0, and the float64 reference states that rule."""
    case = CONV_CASES["many-channels-wide-rows"]
    phi, weight, bias, weight_var, bias_var = _conv_inputs(case, dtype, backend.device)
    weight_var, bias_var = weight_var - 0.05, bias_var - 2.0  # mostly negative sums
    _, var = backend.ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 1)
    _, ref = reference.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 1)
    assert (ref == 0).float().mean() > 0.2 and (var >= 0).all()
    torch.testing.assert_close(var.cpu().double(), ref, rtol=1e-4, atol=1e-4)

    tokens = _rand((5, 40), dtype, backend.device)
    for channels in (3, 20):  # the CPU's register kernel and its BLAS tiles
        w, wv = _rand((channels, 40), dtype, backend.device), _rand((channels, 40), dtype, backend.device)
        bv = _rand((channels,), dtype, backend.device)
        _, var = backend.ops.linear_head_mean_var(tokens, w, None, wv, bv)
        _, ref = reference.linear_head_mean_var(tokens, w, None, wv, bv)
        assert (ref == 0).any() and (var >= 0).all()
        torch.testing.assert_close(var.cpu().double(), ref, rtol=1e-4, atol=1e-4)

    fcase = FACTORED_CASES["batch1-rank1"]
    phi, proj_weight, proj_bias, mix, fbias_var = _factored_inputs(fcase, dtype, backend.device)
    args = (phi, proj_weight, proj_bias, -mix, fbias_var)
    var = backend.ops.conv_head_var_factored(*args, *fcase.conv.geometry)
    ref = reference.conv_head_var_factored(*args, *fcase.conv.geometry)
    assert (ref == 0).any() and (var >= 0).all()
    torch.testing.assert_close(var.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_wrappers_take_ints_or_pairs_and_check_values():
    case = CONV_CASES["stride2-groups2-pad0"]
    phi, weight, bias, weight_var, bias_var = _conv_inputs(case, torch.float64, "cpu")
    mean, var = ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, stride=2, padding=(0, 0), groups=2)
    ref_mean, ref_var = reference.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, *case.geometry, 2)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    with pytest.raises(TypeError, match="`weight_var` is required"):
        ops.conv_head_mean_var(phi, weight, bias)
    bad = weight_var.clone()
    bad[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="`weight_var` is a variance"):
        ops.conv_head_mean_var(phi, weight, bias, bad, bias_var, stride=2, groups=2, check_values=True)
    with pytest.raises(ValueError, match="`stride` must be an int or a pair"):
        ops.conv_head_mean_var(phi, weight, bias, weight_var, stride=(1, 2, 3))

    fcase = FACTORED_CASES["batch1-rank1"]
    fargs = _factored_inputs(fcase, torch.float64, "cpu")
    torch.testing.assert_close(
        ops.conv_head_var_factored(*fargs, padding=1), reference.conv_head_var_factored(*fargs, *fcase.conv.geometry)
    )
    negative_mix = -fargs[3]
    with pytest.raises(ValueError, match="`mix` is a variance"):
        ops.conv_head_var_factored(*fargs[:3], negative_mix, fargs[4], padding=1, check_values=True)

    phi_tokens = torch.randn(3, 8, dtype=torch.float64)
    w, wv = torch.randn(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.linear_head_mean_var(phi_tokens, w, None, wv),
                               reference.linear_head_mean_var(phi_tokens, w, None, wv, None))
    phi_tokens[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`phi` contains NaN"):
        ops.linear_head_mean_var(phi_tokens, w, None, wv, check_values=True)


@pytest.mark.parametrize("namespace", ["bayesdiff_ext", "bayesdiff_ext_emu"])
def test_opcheck(namespace):
    lib = emulation.load() if namespace.endswith("emu") else torch.ops.bayesdiff_ext
    for case, dtype in ((CONV_CASES["batch1-3x3-pad1-odd"], torch.float32), (CONV_CASES["1x1-no-bias"], torch.float64)):
        torch.library.opcheck(lib.conv_head_mean_var, (*_conv_inputs(case, dtype, "cpu"), *case.geometry, case.groups))
    for case in (FACTORED_CASES["batch1-rank1"], FACTORED_CASES["rank-over-a-chunk-no-biases"]):
        torch.library.opcheck(lib.conv_head_var_factored, (*_factored_inputs(case, torch.float32, "cpu"), *case.conv.geometry))
    weight = torch.randn(3, 7)
    torch.library.opcheck(lib.linear_head_mean_var, (torch.randn(2, 5, 7), weight, torch.randn(3), weight.abs(), None))


@pytest.mark.parametrize("size, stride", [(2, 2), (3, 2), (4, 3), (5, 2)])
def test_fake_and_real_conv_heads_agree_on_the_output_size_and_on_what_does_not_fit(size, stride):
    phi, weight = torch.randn(1, 2, size, size), torch.randn(3, 2, 3, 3)
    args = (phi, weight, None, weight.abs(), None, [stride, stride], [0, 0], [1, 1], 1)
    fits = size >= 3
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        if fits:
            fake_shape = torch.ops.bayesdiff_ext.conv_head_mean_var(*fake_args)[0].shape
        else:
            with pytest.raises(RuntimeError, match="does not fit `phi`"):
                torch.ops.bayesdiff_ext.conv_head_mean_var(*fake_args)
    if fits:
        real_shape = torch.ops.bayesdiff_ext.conv_head_mean_var(*args)[0].shape
        assert fake_shape == real_shape == F.conv2d(phi, weight, stride=stride).shape
    else:
        with pytest.raises(RuntimeError, match="does not fit `phi`"):
            torch.ops.bayesdiff_ext.conv_head_mean_var(*args)


def test_torch_compile_fullgraph():
    def predictive(phi, weight, bias, weight_var, bias_var, proj, mix, tokens):
        mean, var = ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, padding=1)
        factored = ops.conv_head_var_factored(phi, proj, None, mix, bias_var, padding=1)
        token_mean, token_var = ops.linear_head_mean_var(tokens, weight.flatten(1), bias, weight_var.flatten(1), None)
        return mean, var + factored, token_mean, token_var

    case = CONV_CASES["batch1-3x3-pad1-odd"]
    phi, weight, bias, weight_var, bias_var = _conv_inputs(case, torch.float32, "cpu")
    args = (phi, weight, bias, weight_var, bias_var, torch.randn(4, 3, 3, 3), torch.rand(2, 4), torch.randn(5, 27))
    compiled = torch.compile(predictive, fullgraph=True)
    for out, ref in zip(compiled(*args), predictive(*args)):
        torch.testing.assert_close(out, ref)


def test_emulated_cuda_matches_conv2d_on_a_head_sized_input():
    """A UNet-like head (C_in = 32, 3×3, padding 1) on both CPU paths: the CPU kernel's register
    tiles and the CUDA kernel's per-pixel loops must give the eager convolutions."""
    phi = torch.randn(2, 32, 12, 20)
    weight, weight_var = torch.randn(3, 32, 3, 3) * 0.1, torch.rand(3, 32, 3, 3) * 0.01
    bias, bias_var = torch.randn(3), torch.rand(3)
    ref_mean = F.conv2d(phi.double(), weight.double(), bias.double(), padding=1)
    ref_var = F.conv2d(phi.double() ** 2, weight_var.double(), bias_var.double(), padding=1)
    for lib in (torch.ops.bayesdiff_ext, emulation.load()):
        mean, var = lib.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, [1, 1], [1, 1], [1, 1], 1)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_lower_isa_compilations_match_reference(isa, monkeypatch):
    """The CPU kernels are compiled per ISA (vector width) and the best one the CPU supports runs;
    BAYESDIFF_CPU_ISA selects a lower one, so that each compilation is checked here."""
    monkeypatch.setenv("BAYESDIFF_CPU_ISA", isa)
    for dtype in (torch.float32, torch.float64, torch.float16):
        for case in (CONV_CASES["many-channels-wide-rows"], CONV_CASES["stride2-groups2-pad0"]):
            args = _conv_inputs(case, dtype, "cpu")
            out = torch.ops.bayesdiff_ext.conv_head_mean_var(*args, *case.geometry, case.groups)
            ref = reference.conv_head_mean_var(*args, *case.geometry, case.groups)
            for o, r, b in zip(out, ref, _diag_bounds(*args, case)):
                _assert_within(o, r, b, dtype)
        tokens = _rand((4, 45), dtype, "cpu")
        weight, weight_var = _rand((6, 45), dtype, "cpu"), _rand((6, 45), dtype, "cpu", positive=True)
        args = (tokens, weight, None, weight_var, None)
        out = torch.ops.bayesdiff_ext.linear_head_mean_var(*args)
        bounds = reference.linear_head_mean_var(*[None if t is None else t.double().abs() for t in args])
        for o, r, b in zip(out, reference.linear_head_mean_var(*args), bounds):
            _assert_within(o, r, b, dtype)


def test_unknown_isa_is_named(monkeypatch):
    monkeypatch.setenv("BAYESDIFF_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="BAYESDIFF_CPU_ISA must be avx512, avx2 or baseline"):
        torch.ops.bayesdiff_ext.linear_head_mean_var(torch.ones(2, 3), torch.ones(1, 3), None, torch.ones(1, 3), None)

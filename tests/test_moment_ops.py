"""moment_step, mc_moments and mc_moment_step: every backend against the float64 reference, opcheck,
compile, errors."""

import pytest
import torch

from bayesdiff_ext import ops, reference

SHAPES = [(1,), (7,), (1, 3, 5, 5), (2, 4, 17, 9), (3, 1, 33, 31)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances for outputs accumulated in float32 (fp16/bf16 inputs are exact in float32).
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def _rand(shape, dtype, device, positive=False, scale=1.0, offset=0.0):
    t = torch.randn(shape, dtype=torch.float64) * scale + offset
    if positive:
        t = t.abs()
    return t.to(dtype=dtype, device=device)


def _assert_close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=tol * 10, atol=tol * scale)


def _moment_inputs(shape, dtype, device, with_optional=True):
    mean_x = _rand(shape, dtype, device)
    var_x = _rand(shape, dtype, device, positive=True)
    eps_mean = _rand(shape, dtype, device)
    eps_var = _rand(shape, dtype, device, positive=True) if with_optional else None
    cov = _rand(shape, dtype, device, scale=0.3) if with_optional else None
    return mean_x, var_x, eps_mean, eps_var, cov


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_optional", [True, False])
def test_moment_step_matches_reference(backend, shape, dtype, with_optional):
    args = _moment_inputs(shape, dtype, backend.device, with_optional)
    a, b, c2 = 1.0213, -0.3377, 0.0125
    mean_next, var_next = backend.ops.moment_step(*args, a, b, c2, True)
    ref_mean, ref_var = reference.moment_step(*args, a, b, c2, True)
    assert mean_next.dtype == ops.result_dtype(dtype) and mean_next.is_contiguous()
    assert mean_next.shape == shape and var_next.shape == shape
    _assert_close(mean_next, ref_mean, dtype, scale=4)
    _assert_close(var_next, ref_var, dtype, scale=4)
    assert (var_next >= 0).all()


def test_moment_step_clamps_only_when_asked(backend):
    shape = (2, 3, 9, 11)
    mean_x, var_x, eps_mean, eps_var, _ = _moment_inputs(shape, torch.float32, backend.device)
    cov = -10 * torch.ones(shape, device=backend.device)  # drives a²v + 2ab·cov + b²w below zero
    _, clamped = backend.ops.moment_step(mean_x, var_x, eps_mean, eps_var, cov, 1.0, 1.0, 0.0, True)
    _, raw = backend.ops.moment_step(mean_x, var_x, eps_mean, eps_var, cov, 1.0, 1.0, 0.0, False)
    assert (raw < 0).any() and (clamped >= 0).all()
    _, ref_raw = reference.moment_step(mean_x, var_x, eps_mean, eps_var, cov, 1.0, 1.0, 0.0, False)
    _assert_close(raw, ref_raw, torch.float32, scale=40)


def test_moment_step_keeps_nan_visible(backend):
    mean_x, var_x, eps_mean, eps_var, cov = _moment_inputs((5,), torch.float32, backend.device)
    var_x[2] = float("nan")
    _, var_next = backend.ops.moment_step(mean_x, var_x, eps_mean, eps_var, cov, 0.9, 0.1, 0.0, True)
    assert torch.isnan(var_next[2]) and torch.isfinite(var_next[[0, 1, 3, 4]]).all()


def test_moment_step_non_contiguous(backend):
    base = _moment_inputs((4, 6, 10, 12), torch.float32, backend.device)
    views = [t.transpose(-1, -2)[:, 1:5, ::3] for t in base]
    assert not views[0].is_contiguous()
    out = backend.ops.moment_step(*views, 0.7, 0.4, 0.01, True)
    ref = reference.moment_step(*views, 0.7, 0.4, 0.01, True)
    for o, r in zip(out, ref):
        assert o.is_contiguous()
        _assert_close(o, r, torch.float32, scale=4)


def _mc_inputs(samples, shape, dtype, device, offset=0.0, spread=1.0, with_var=True):
    x = _rand((samples, *shape), dtype, device, scale=spread, offset=offset)
    eps_mean = _rand((samples, *shape), dtype, device, scale=spread, offset=offset)
    eps_var = _rand((samples, *shape), dtype, device, positive=True) if with_var else None
    mean_x = _rand(shape, dtype, device, scale=spread, offset=offset)
    return x, eps_mean, eps_var, mean_x


@pytest.mark.parametrize("samples", [1, 2, 10, 33])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mc_moments_matches_reference(backend, samples, shape, dtype):
    args = _mc_inputs(samples, shape, dtype, backend.device, with_var=samples != 2)
    out = backend.ops.mc_moments(*args)
    ref = reference.mc_moments(*args)
    for o, r in zip(out, ref):
        assert o.shape == shape and o.dtype == ops.result_dtype(dtype) and o.is_contiguous()
        _assert_close(o, r, dtype, scale=8)
    assert (out[1] >= 0).all()


def test_mc_moments_single_sample_has_no_spread(backend):
    x, eps_mean, eps_var, mean_x = _mc_inputs(1, (3, 7), torch.float64, backend.device)
    e_eps, var_eps, cov = backend.ops.mc_moments(x, eps_mean, eps_var, mean_x)
    torch.testing.assert_close(e_eps, eps_mean[0])
    torch.testing.assert_close(var_eps, eps_var[0])
    torch.testing.assert_close(cov, (x[0] - mean_x) * eps_mean[0])


def test_mc_moments_large_magnitudes_stay_accurate(backend):
    """ε offset by 1e4 with unit spread: E[m²] − E[m]² cancels 8 digits in float32; the one-pass
    (shifted-sum) kernel does not. Its float32 result must match a float64 reference on the same
    (float32-rounded) inputs at float32 precision of the *spread*, not of the offset."""
    samples, shape = 64, (2, 5, 13)
    mean_x = torch.randn(shape)
    x = mean_x + torch.randn(samples, *shape)
    eps_mean = 1e4 + 0.5 * x + torch.randn(samples, *shape)
    eps_var = torch.rand(samples, *shape)
    args = [t.to(backend.device) for t in (x, eps_mean, eps_var, mean_x)]
    out = backend.ops.mc_moments(*args)
    ref = reference.mc_moments(*args)
    torch.testing.assert_close(out[1].cpu().double(), ref[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[2].cpu().double(), ref[2], rtol=1e-4, atol=1e-2)
    # The naive float32 formula, for contrast, is off by O(1) here.
    naive = (eps_mean * eps_mean).mean(0) - eps_mean.mean(0) ** 2
    assert (naive.double() - (ref[1] - eps_var.double().mean(0))).abs().max() > 1.0


def test_mc_moments_large_x_offset_stays_accurate(backend):
    """x and E[x] offset by 1e4 with spread 1e-2 (a pixel whose draws barely move): E[x·m] − E[x]·E[m]
    cancels ~6 digits in float32; the kernel subtracts E[x] from each draw first,
    so the covariance keeps float32 precision relative to the spread."""
    samples, shape = 16, (3, 7, 5)
    mean_x = 1e4 + torch.randn(shape)
    x = mean_x + 1e-2 * torch.randn(samples, *shape)
    eps_mean = 2.0 + 30.0 * (x - mean_x) + 0.1 * torch.randn(samples, *shape)
    eps_var = torch.rand(samples, *shape)
    args = [t.to(backend.device) for t in (x, eps_mean, eps_var, mean_x)]
    out = backend.ops.mc_moments(*args)
    ref = reference.mc_moments(*args)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.cpu().double(), r, rtol=1e-4, atol=1e-6)
    # The naive float32 formula, for contrast, is off by more than 5% of the largest covariance here.
    naive = (x * eps_mean).mean(0) - mean_x * eps_mean.mean(0)
    assert (naive.double() - ref[2]).abs().max() > 0.05 * ref[2].abs().max()


def test_mc_moments_non_contiguous(backend):
    base = _mc_inputs(5, (3, 8, 10), torch.float32, backend.device)
    x, eps_mean, eps_var = (t.transpose(-1, -2) for t in base[:3])
    mean_x = base[3].transpose(-1, -2)
    out = backend.ops.mc_moments(x, eps_mean, eps_var, mean_x)
    ref = reference.mc_moments(x, eps_mean, eps_var, mean_x)
    for o, r in zip(out, ref):
        assert o.is_contiguous()
        _assert_close(o, r, torch.float32, scale=8)


STEP = dict(a=1.0213, b=-0.3377, c2=0.0125)


def _step_inputs(samples, shape, dtype, device, with_var=True, **mc):
    return (*_mc_inputs(samples, shape, dtype, device, with_var=with_var, **mc), _rand(shape, dtype, device, positive=True))


@pytest.mark.parametrize("samples", [1, 3, 10])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mc_moment_step_matches_reference(backend, samples, shape, dtype):
    args = _step_inputs(samples, shape, dtype, backend.device, with_var=samples != 3)
    out = backend.ops.mc_moment_step(*args, *STEP.values(), True)
    ref = reference.mc_moment_step(*args, *STEP.values(), True)
    for o, r in zip(out, ref):
        assert o.shape == shape and o.dtype == ops.result_dtype(dtype) and o.is_contiguous()
        _assert_close(o, r, dtype, scale=8)
    assert (out[1] >= 0).all() and (out[2] >= 0).all()


def test_mc_moment_step_is_the_pair_in_one_pass(backend):
    """The same float32 arithmetic as mc_moments then moment_step, so the same values up to the
    compiler's choice of fused multiply-adds; var_eps is mc_moments' own."""
    args = _step_inputs(10, (2, 3, 33, 35), torch.float32, backend.device)
    x, eps_mean, eps_var, mean_x, var_x = args
    e_eps, var_eps, cov = backend.ops.mc_moments(x, eps_mean, eps_var, mean_x)
    pair = backend.ops.moment_step(mean_x, var_x, e_eps, var_eps, cov, *STEP.values(), True)
    fused = backend.ops.mc_moment_step(*args, *STEP.values(), True)
    for o, r in zip(fused, (*pair, var_eps)):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_mc_moment_step_clamps_only_when_asked_and_keeps_nan(backend):
    x, eps_mean, eps_var, mean_x, var_x = _step_inputs(4, (3, 37), torch.float32, backend.device)
    x = x + 5 * (eps_mean - eps_mean.mean(0))  # a strong positive covariance ...
    _, clamped, _ = backend.ops.mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, 1.0, -1.0, 0.0, True)
    _, raw, _ = backend.ops.mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, 1.0, -1.0, 0.0, False)
    assert (raw < 0).any() and (clamped >= 0).all()  # ... that 2ab·Cov (ab < 0) drives below zero
    _assert_close(raw, reference.mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, 1.0, -1.0, 0.0, False)[1], torch.float32, scale=80)
    var_x[1, 5] = float("nan")
    eps_var[2, 0, 9] = float("nan")
    mean_next, var_next, var_eps = backend.ops.mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, 0.9, 0.1, 0.0, True)
    assert torch.isnan(var_next[1, 5]) and torch.isnan(var_next[0, 9]) and torch.isnan(var_eps[0, 9])
    assert int(torch.isnan(var_next).sum()) == 2 and torch.isfinite(mean_next).all()


def test_mc_moment_step_non_contiguous(backend):
    base = _step_inputs(5, (3, 8, 10), torch.float32, backend.device)
    views = [t.transpose(-1, -2) for t in base]
    assert not views[0].is_contiguous()
    out = backend.ops.mc_moment_step(*views, 0.7, 0.4, 0.01, True)
    ref = reference.mc_moment_step(*views, 0.7, 0.4, 0.01, True)
    for o, r in zip(out, ref):
        assert o.is_contiguous()
        _assert_close(o, r, torch.float32, scale=8)


def test_empty_tensors(backend):
    e = torch.empty(0, 3, device=backend.device)
    mean_next, var_next = backend.ops.moment_step(e, e, e, None, None, 1.0, 1.0, 0.0, True)
    assert mean_next.shape == (0, 3)
    stack = torch.empty(4, 0, 3, device=backend.device)
    out = backend.ops.mc_moments(stack, stack, None, e)
    assert all(o.shape == (0, 3) for o in out)
    out = backend.ops.mc_moment_step(stack, stack, None, e, e, 1.0, 1.0, 0.0, True)
    assert all(o.shape == (0, 3) for o in out)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(var_x=a["var_x"][:, :2]), "`var_x` must have shape"),
        (lambda a: a.update(eps_mean=a["eps_mean"].double()), "`eps_mean` has dtype"),
        (lambda a: a.update(eps_var=a["eps_var"].unsqueeze(0)), "`eps_var` must have shape"),
        (lambda a: a.update(cov_x_eps=a["cov_x_eps"].half()), "`cov_x_eps` has dtype"),
        (lambda a: a.update(mean_x=a["mean_x"].long(), var_x=a["var_x"].long()), "`mean_x` must be float16"),
        (lambda a: a.update(c2=-0.1), "`c2`"),
        (lambda a: a.update(a=float("nan")), "`a` must be finite"),
    ],
)
def test_moment_step_errors_name_the_argument(backend, mutate, message):
    mean_x, var_x, eps_mean, eps_var, cov = _moment_inputs((2, 3), torch.float32, backend.device)
    kwargs = dict(mean_x=mean_x, var_x=var_x, eps_mean=eps_mean, eps_var=eps_var, cov_x_eps=cov, a=1.0, b=0.5, c2=0.0)
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.moment_step(**kwargs, clamp=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(eps_mean=a["eps_mean"][:3]), "`eps_mean` must have shape"),
        (lambda a: a.update(mean_x=a["mean_x"][0]), "`mean_x` must have shape"),
        (lambda a: a.update(eps_var=a["eps_var"].double()), "`eps_var` has dtype"),
        (lambda a: a.update(x=a["x"][0, 0, 0]), r"\(S, \.\.\.\)"),
        (lambda a: a.update(x=a["x"][:0], eps_mean=a["eps_mean"][:0], eps_var=None), "S >= 1"),
    ],
)
def test_mc_moments_errors_name_the_argument(backend, mutate, message):
    x, eps_mean, eps_var, mean_x = _mc_inputs(4, (2, 3), torch.float32, backend.device)
    kwargs = dict(x=x, eps_mean=eps_mean, eps_var=eps_var, mean_x=mean_x)
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.mc_moments(**kwargs)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(var_x=a["var_x"][:, :2]), "`var_x` must have shape"),
        (lambda a: a.update(var_x=a["var_x"].double()), "`var_x` has dtype"),
        (lambda a: a.update(eps_mean=a["eps_mean"][:3]), "`eps_mean` must have shape"),
        (lambda a: a.update(mean_x=a["mean_x"][0]), "`mean_x` must have shape"),
        (lambda a: a.update(x=a["x"][:0], eps_mean=a["eps_mean"][:0], eps_var=None), "S >= 1"),
        (lambda a: a.update(c2=-0.1), "`c2`"),
        (lambda a: a.update(b=float("inf")), "`b` must be finite"),
    ],
)
def test_mc_moment_step_errors_name_the_argument(backend, mutate, message):
    x, eps_mean, eps_var, mean_x, var_x = _step_inputs(4, (2, 3), torch.float32, backend.device)
    kwargs = dict(x=x, eps_mean=eps_mean, eps_var=eps_var, mean_x=mean_x, var_x=var_x, a=1.0, b=0.5, c2=0.0)
    mutate(kwargs)
    with pytest.raises(RuntimeError, match=message):
        backend.ops.mc_moment_step(**kwargs, clamp=True)


def test_mixed_devices_are_named():
    meta = torch.empty(2, 3, device="meta")
    cpu = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="`var_x` is on meta"):
        torch.ops.bayesdiff_ext.moment_step(cpu, meta, cpu, None, None, 1.0, 1.0, 0.0, True)


def test_value_checks_in_python_wrappers():
    mean_x, var_x, eps_mean, eps_var, cov = _moment_inputs((2, 3), torch.float32, "cpu")
    bad = var_x.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="`var_x` is a variance"):
        ops.moment_step(mean_x, bad, eps_mean, eps_var, cov, a=1.0, b=1.0, check_values=True)
    eps_mean[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`eps_mean` contains NaN"):
        ops.moment_step(mean_x, var_x, eps_mean, a=1.0, b=1.0, check_values=True)
    x, m, v, mx = _mc_inputs(3, (4,), torch.float32, "cpu")
    v[1, 1] = -0.5
    with pytest.raises(ValueError, match="`eps_var` is a variance"):
        ops.mc_moments(x, m, v, mx, check_values=True)
    v[1, 1] = 0.5
    bad_var_x = -torch.ones(4)
    with pytest.raises(ValueError, match="`var_x` is a variance"):
        ops.mc_moment_step(x, m, v, mx, bad_var_x, a=1.0, b=1.0, check_values=True)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`x` contains NaN"):
        ops.mc_moment_step(x, m, v, mx, bad_var_x, a=1.0, b=1.0, check_values=True)


def test_wrappers_route_to_the_ops():
    args = _moment_inputs((3, 4), torch.float64, "cpu")
    out = ops.moment_step(*args, a=0.5, b=0.25, c2=0.1)
    ref = reference.moment_step(*args, 0.5, 0.25, 0.1, True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    args = _step_inputs(3, (3, 4), torch.float64, "cpu")
    out = ops.mc_moment_step(*args, a=0.5, b=0.25, c2=0.1, clamp=False)
    for o, r in zip(out, reference.mc_moment_step(*args, 0.5, 0.25, 0.1, False)):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("namespace", ["bayesdiff_ext", "bayesdiff_ext_emu"])
def test_opcheck(namespace):
    from bayesdiff_ext import emulation

    lib = emulation.load() if namespace.endswith("emu") else torch.ops.bayesdiff_ext
    for args in (_moment_inputs((2, 3, 5), torch.float32, "cpu"), _moment_inputs((4,), torch.float64, "cpu", False)):
        torch.library.opcheck(lib.moment_step, (*args, 0.9, -0.2, 0.05, True))
    for args in (_mc_inputs(3, (2, 5), torch.float32, "cpu"), _mc_inputs(1, (7,), torch.float64, "cpu", with_var=False)):
        torch.library.opcheck(lib.mc_moments, args)
    for args in (_step_inputs(3, (2, 5), torch.float32, "cpu"), _step_inputs(1, (7,), torch.float64, "cpu", with_var=False)):
        torch.library.opcheck(lib.mc_moment_step, (*args, 0.9, -0.2, 0.05, True))


def test_torch_compile_fullgraph():
    def step(x, m, v, mean_x, var_x):
        e, ve, cov = ops.mc_moments(x, m, v, mean_x)
        return ops.moment_step(mean_x, var_x, e, ve, cov, a=0.98, b=-0.1, c2=0.0)

    args = _mc_inputs(4, (2, 3, 6), torch.float32, "cpu") + (torch.rand(2, 3, 6),)
    compiled = torch.compile(step, fullgraph=True)
    for o, r in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(o, r)
    fused = torch.compile(lambda *a: ops.mc_moment_step(*a, a=0.98, b=-0.1), fullgraph=True)
    for o, r in zip(fused(*args), ops.mc_moment_step(*args, a=0.98, b=-0.1)):
        torch.testing.assert_close(o, r)


def test_cpu_kernels_agree_across_threads():
    """The suite runs single-threaded; the parallel_for chunking needs its own check (large enough
    for both ops to split, and of odd size so that one thread's range ends in a tail)."""
    args = _mc_inputs(6, (3, 5, 81, 83), torch.float32, "cpu")
    single = torch.ops.bayesdiff_ext.mc_moments(*args)
    step_args = _moment_inputs((3, 5, 81, 83), torch.float32, "cpu")
    single_step = torch.ops.bayesdiff_ext.moment_step(*step_args, 0.9, 0.3, 0.01, True)
    fused_args = (*args, step_args[1])
    single_fused = torch.ops.bayesdiff_ext.mc_moment_step(*fused_args, 0.9, 0.3, 0.01, True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for o, r in zip(torch.ops.bayesdiff_ext.mc_moments(*args), single):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        for o, r in zip(torch.ops.bayesdiff_ext.mc_moment_step(*fused_args, 0.9, 0.3, 0.01, True), single_fused):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
        for o, r in zip(torch.ops.bayesdiff_ext.moment_step(*step_args, 0.9, 0.3, 0.01, True), single_step):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_compilation_matches_reference(isa, dtype, monkeypatch):
    """The CPU kernels are compiled per ISA (vector width, 16-bit conversions) and the best one the
    CPU supports runs; BAYESDIFF_CPU_ISA selects a lower one, so that each compilation is checked
    (sizes with vector blocks and a tail; the second spans several of mc_moments' chunks)."""
    monkeypatch.setenv("BAYESDIFF_CPU_ISA", isa)
    for shape, with_var in (((3, 7, 37), True), ((3, 7, 37), False), ((5, 11, 41), True)):
        args = _mc_inputs(5, shape, dtype, "cpu", with_var=with_var)
        for o, r in zip(torch.ops.bayesdiff_ext.mc_moments(*args), reference.mc_moments(*args)):
            _assert_close(o, r, dtype, scale=8)
        step_args = _moment_inputs(shape, dtype, "cpu", with_optional=with_var)
        out = torch.ops.bayesdiff_ext.moment_step(*step_args, 1.0213, -0.3377, 0.0125, True)
        for o, r in zip(out, reference.moment_step(*step_args, 1.0213, -0.3377, 0.0125, True)):
            _assert_close(o, r, dtype, scale=4)
        fused_args = (*args, step_args[1])
        out = torch.ops.bayesdiff_ext.mc_moment_step(*fused_args, *STEP.values(), True)
        for o, r in zip(out, reference.mc_moment_step(*fused_args, *STEP.values(), True)):
            _assert_close(o, r, dtype, scale=8)


def test_half_conversion_keeps_subnormals_infinities_and_nan():
    """The vector float16 load (F16C) against torch's own conversion on every special class."""
    special = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0, float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    values = special.repeat(7).half()  # 70 elements: vector blocks and a tail
    zeros = torch.zeros_like(values)
    mean_next, _ = torch.ops.bayesdiff_ext.moment_step(values, zeros, zeros, None, None, 1.0, 0.0, 0.0, True)
    torch.testing.assert_close(mean_next, values.float(), rtol=0, atol=0, equal_nan=True)

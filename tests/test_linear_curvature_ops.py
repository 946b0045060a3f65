"""linear_diag_ggn, linear_diag_ef, linear_gram: every backend against the float64 reference, every
input dtype, odd shapes, non-contiguous inputs, CPU tiles and threads, empty inputs, opcheck, errors."""

import math

import pytest
import torch

from bayesdiff_ext import emulation, ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (phi shape, C). Between them: batch 1, one token per sample (2-D φ), several token dims, D + 1 > 32
# (several Gram and EF feature tiles, with tails), C > 8 (several EF output tiles), more than 32
# tokens per sample (several shared-memory steps), and a D below one vector.
CASES = {
    "batch1-tokens": ((1, 37, 5), 3),
    "rows-are-samples": ((7, 33), 9),
    "token-grid": ((2, 3, 11, 6), 2),
    "wide-features": ((2, 40, 70), 4),
    "tiny-features": ((3, 2, 1), 1),
}


def _inputs(shape, outputs, dtype, device, scale=1.0):
    phi = (scale * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)
    residual = torch.randn((*shape[:-1], outputs), dtype=torch.float64).to(dtype=dtype, device=device)
    return phi, residual


def _assert_close(actual, expected):
    """float64 accumulation for every dtype (16-bit and float32 inputs are exact in float64)."""
    assert actual.dtype == torch.float64 and actual.is_contiguous()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-12 * scale)


def _check_all(lib, phi, residual):
    rows = math.prod(phi.shape[:-1])
    features = phi.shape[-1]
    ggn = lib.linear_diag_ggn(phi)
    assert ggn.shape == (features,)
    _assert_close(ggn, reference.linear_diag_ggn(phi))

    ef = lib.linear_diag_ef(phi, residual)
    assert ef.shape == (residual.shape[-1], features + 1)
    _assert_close(ef, reference.linear_diag_ef(phi, residual))
    assert (ef >= 0).all()

    gram = lib.linear_gram(phi)
    assert gram.shape == (features + 1, features + 1)
    _assert_close(gram, reference.linear_gram(phi))
    assert float(gram[features, features]) == rows
    assert torch.equal(gram, gram.t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, outputs", CASES.values(), ids=CASES.keys())
def test_accumulators_match_reference(backend, shape, outputs, dtype):
    _check_all(backend.ops, *_inputs(shape, outputs, dtype, backend.device))


def test_half_inputs_do_not_overflow(backend):
    """|φ| ≈ 200 over 80 rows: sums of squares pass 65504, where a float16 accumulator overflows."""
    phi, residual = _inputs((2, 40, 6), 3, torch.float16, backend.device, scale=200.0)
    assert float(reference.linear_diag_ggn(phi).max()) > 65504
    _check_all(backend.ops, phi, residual)


def test_non_contiguous_inputs(backend):
    base, residual = _inputs((9, 4, 2, 7), 3, torch.float32, backend.device)
    phi = base.transpose(1, 2)  # (9, 2, 4, 7)
    residual = residual.transpose(1, 2)
    assert not phi.is_contiguous() and not residual.is_contiguous()
    _check_all(backend.ops, phi, residual)
    _check_all(backend.ops, phi[:, :, ::2], residual[:, :, ::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tiles_and_threads(dtype):
    """The CPU's EF and Gram work through 16 MiB tiles of float64 rows, the GGN through per-thread
    partial sums: rows enough for several tiles per sample, at 1 and 2 threads."""
    phi, residual = _inputs((2, 2100, 500), 3, dtype, "cpu")  # 2100·501·8 B: two tiles per sample
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _check_all(torch.ops.bayesdiff_ext, phi, residual)
    finally:
        torch.set_num_threads(previous)


def test_cpu_gram_blocks():
    """The CPU forms the Gram in blocks of 512 columns on and above the diagonal, then mirrors them:
    D + 1 = 1101 gives three blocks with a tail; the result is exactly symmetric."""
    phi = torch.randn(3, 20, 1100)
    gram = torch.ops.bayesdiff_ext.linear_gram(phi)
    _assert_close(gram, reference.linear_gram(phi))
    assert torch.equal(gram, gram.t())


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_compilation_matches_reference(isa, dtype, monkeypatch):
    """The CPU's vector code (square sums, float64 widening of rows) is compiled per ISA;
    BAYESDIFF_CPU_ISA selects a lower one. The conv diagonal GGN shares the square sums."""
    monkeypatch.setenv("BAYESDIFF_CPU_ISA", isa)
    _check_all(torch.ops.bayesdiff_ext, *_inputs((2, 9, 37), 3, dtype, "cpu"))
    phi = torch.randn(3, 2, 7, 37, dtype=torch.float64).to(dtype)
    ggn = torch.ops.bayesdiff_ext.conv_diag_ggn(phi, [3, 3], [1, 1], [1, 1], [1, 1])
    expected = reference.conv_diag_ggn(phi, [3, 3], [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(ggn.double(), expected, rtol=1e-12 if dtype == torch.float64 else 2e-5, atol=0)


def test_empty_inputs(backend):
    ops_ = backend.ops
    phi, residual = _inputs((0, 5, 4), 3, torch.float32, backend.device)
    assert torch.equal(ops_.linear_diag_ggn(phi).cpu(), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(ops_.linear_diag_ef(phi, residual).cpu(), torch.zeros(3, 5, dtype=torch.float64))
    assert torch.equal(ops_.linear_gram(phi).cpu(), torch.zeros(5, 5, dtype=torch.float64))
    no_tokens, no_token_residual = _inputs((2, 0, 4), 3, torch.float32, backend.device)
    assert torch.equal(ops_.linear_diag_ef(no_tokens, no_token_residual).cpu(), torch.zeros(3, 5, dtype=torch.float64))
    no_features, features_residual = _inputs((2, 3, 0), 2, torch.float32, backend.device)
    _check_all(ops_, no_features, features_residual)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lib, p, r: lib.linear_diag_ggn(p.long()), "`phi` must be float16"),
        (lambda lib, p, r: lib.linear_gram(p[0, 0, 0]), r"`phi` must have shape \(\.\.\., D\)"),
        (lambda lib, p, r: lib.linear_diag_ef(p[0, 0], r[0, 0]), r"`phi` must have shape \(N, \.\.\., D\)"),
        (lambda lib, p, r: lib.linear_diag_ef(p, r[0]), "`residual` must have shape"),
        (lambda lib, p, r: lib.linear_diag_ef(p, r[:, :2]), "`residual` must have shape"),
        (lambda lib, p, r: lib.linear_diag_ef(p, r.double()), "`residual` has dtype"),
    ],
)
def test_errors_name_the_argument(backend, call, message):
    phi, residual = _inputs((2, 3, 4), 2, torch.float32, backend.device)
    with pytest.raises(RuntimeError, match=message):
        call(backend.ops, phi, residual)


def test_wrappers_split_the_bias_part():
    phi, residual = _inputs((3, 5, 4), 2, torch.float32, "cpu")
    full = reference.linear_diag_ef(phi, residual)
    weight, bias = ops.linear_diag_ef(phi, residual, with_bias=True)
    _assert_close(weight.contiguous(), full[:, :-1])
    _assert_close(bias.contiguous(), full[:, -1])
    # The bias part is the squared per-sample sum of residuals.
    torch.testing.assert_close(bias, residual.double().sum(1).square().sum(0))
    _assert_close(ops.linear_diag_ef(phi, residual).contiguous(), full[:, :-1])
    _assert_close(ops.linear_diag_ggn(phi), reference.linear_diag_ggn(phi))
    _assert_close(ops.linear_gram(phi), reference.linear_gram(phi))


def test_equal_to_the_conv_accumulators_on_a_1x1_head():
    """A Linear head on φ (R, D) is a 1×1 conv on (R, D, 1, 1): the sums agree with the conv ops."""
    phi, residual = _inputs((6, 5), 3, torch.float64, "cpu")
    image_phi, image_residual = phi[:, :, None, None], residual[:, :, None, None]
    conv_ggn = ops.conv_diag_ggn(image_phi, 1)
    torch.testing.assert_close(ops.linear_diag_ggn(phi), conv_ggn.flatten())
    conv_ef = ops.conv_diag_ef(image_phi, image_residual, 1)
    torch.testing.assert_close(ops.linear_diag_ef(phi, residual), conv_ef.flatten(1))
    torch.testing.assert_close(ops.linear_gram(phi), ops.conv_patch_gram(image_phi, 1))


@pytest.mark.parametrize("namespace", ["bayesdiff_ext", "bayesdiff_ext_emu"])
def test_opcheck(namespace):
    lib = emulation.load() if namespace.endswith("emu") else torch.ops.bayesdiff_ext
    for shape, outputs, dtype in (((2, 3, 5), 2, torch.float32), ((4, 7), 3, torch.float64)):
        phi, residual = _inputs(shape, outputs, dtype, "cpu")
        torch.library.opcheck(lib.linear_diag_ggn, (phi,))
        torch.library.opcheck(lib.linear_diag_ef, (phi, residual))
        torch.library.opcheck(lib.linear_gram, (phi,))

"""conv_diag_ggn, conv_diag_ef, conv_patch_gram: every backend against the float64 reference,
16-bit inputs, non-contiguous inputs, chunk boundaries, empty batches, opcheck and errors."""

import pytest
import torch

from bayesdiff_ext import emulation, ops, reference

# (N, C_in, H, W, kernel_size, stride, padding, dilation, C_out). Between them: 1×1 and 3×3 and
# rectangular kernels, stride 2, dilation 2, padding 0/1, batch 1, odd sizes, more than 32
# positions (several shared-memory steps), more positions than a block has threads, D + 1 > 32
# (several Gram tiles, with tails) and C_out > 8 (several EF channel tiles).
CASES = [
    pytest.param((2, 3, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 4), id="3x3-pad1"),
    pytest.param((3, 5, 7, 6, (1, 1), (1, 1), (0, 0), (1, 1), 3), id="1x1"),
    pytest.param((2, 4, 11, 9, (3, 3), (2, 2), (1, 1), (1, 1), 2), id="stride2"),
    pytest.param((2, 3, 13, 10, (3, 3), (1, 1), (0, 0), (2, 2), 3), id="dilation2-pad0"),
    pytest.param((1, 2, 8, 7, (3, 2), (2, 1), (0, 1), (1, 2), 1), id="batch1-mixed"),
    pytest.param((2, 6, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 9), id="many-tiles"),
    pytest.param((1, 2, 20, 17, (3, 3), (1, 1), (1, 1), (1, 1), 2), id="many-positions"),
]
HALF_TYPES = [torch.float16, torch.bfloat16]


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _inputs(case, dtype, device, scale=1.0):
    n, c_in, h, w, kernel, stride, padding, dilation, c_out = case
    out_h = _out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    out_w = _out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    phi = (scale * torch.randn(n, c_in, h, w, dtype=torch.float64)).to(dtype=dtype, device=device)
    residual = torch.randn(n, c_out, out_h, out_w, dtype=torch.float64).to(dtype=dtype, device=device)
    return phi, residual, (list(kernel), list(stride), list(padding), list(dilation))


def _assert_close(actual, expected, dtype):
    """float64 to rounding; everything else was accumulated in float32."""
    assert actual.dtype == ops.result_dtype(dtype) and actual.is_contiguous()
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=rtol, atol=rtol * scale)


def _check_all(lib, phi, residual, geometry, dtype):
    n, c_in = phi.shape[:2]
    kernel = geometry[0]
    ggn = lib.conv_diag_ggn(phi, *geometry)
    assert ggn.shape == (c_in, *kernel)
    _assert_close(ggn, reference.conv_diag_ggn(phi, *geometry), dtype)
    assert (ggn >= 0).all()

    ef = lib.conv_diag_ef(phi, residual, *geometry)
    assert ef.shape == (residual.shape[1], c_in, *kernel)
    _assert_close(ef, reference.conv_diag_ef(phi, residual, *geometry), dtype)
    assert (ef >= 0).all()

    gram = lib.conv_patch_gram(phi, *geometry)
    patch = c_in * kernel[0] * kernel[1]
    assert gram.shape == (patch + 1, patch + 1)
    _assert_close(gram, reference.conv_patch_gram(phi, *geometry), dtype)
    # The bias entry counts the positions exactly; the Gram is symmetric positive semi-definite.
    assert float(gram[patch, patch]) == n * residual.shape[2] * residual.shape[3]
    _assert_close(gram, gram.t().cpu().double(), dtype)
    assert float(torch.linalg.eigvalsh(gram.cpu().double()).min()) >= -1e-4 * float(gram.abs().max())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulators_match_reference(backend, case, dtype):
    phi, residual, geometry = _inputs(case, dtype, backend.device)
    _check_all(backend.ops, phi, residual, geometry, dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_inputs_accumulate_in_float32(backend, dtype):
    """|φ| ≈ 30 over ~100 positions: sums of squares pass 65504, where a float16 accumulator would
    overflow and a bfloat16 one would drop most digits."""
    case = (2, 3, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 4)
    phi, residual, geometry = _inputs(case, dtype, backend.device, scale=30.0)
    _check_all(backend.ops, phi, residual, geometry, dtype)
    assert float(backend.ops.conv_patch_gram(phi, *geometry).max()) > 65504


def test_non_contiguous_inputs(backend):
    case = (2, 6, 10, 12, (3, 3), (1, 1), (1, 1), (1, 1), 3)
    phi, residual, geometry = _inputs(case, torch.float32, backend.device)
    views = [
        (phi.transpose(2, 3), residual.transpose(2, 3)),  # transposed planes
        (phi[:, ::2], residual[:, 1:]),  # strided channels
        (
            phi.contiguous(memory_format=torch.channels_last),
            residual.contiguous(memory_format=torch.channels_last),
        ),
    ]
    for phi_view, residual_view in views:
        assert not phi_view.is_contiguous()
        _check_all(backend.ops, phi_view, residual_view, geometry, torch.float32)


def test_cpu_chunks_cover_large_inputs():
    """Above 16 MiB the CPU path unfolds chunks of positions: here 3 Gram chunks across the image
    boundary and 2 EF chunks within each image (float64, D = 144, 128×128 images)."""
    case = (2, 16, 128, 128, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    phi, residual, geometry = _inputs(case, torch.float64, "cpu")
    _check_all(torch.ops.bayesdiff_ext, phi, residual, geometry, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_gram_blocks(dtype):
    """The CPU forms Grams in blocks of 512 columns on and above the diagonal and mirrors them:
    D + 1 = 1126 gives three blocks with a tail; the result is exactly symmetric."""
    case = (2, 125, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    phi, _, geometry = _inputs(case, dtype, "cpu")
    gram = torch.ops.bayesdiff_ext.conv_patch_gram(phi, *geometry)
    _assert_close(gram, reference.conv_patch_gram(phi, *geometry), dtype)
    assert torch.equal(gram, gram.t())


def test_empty_batch(backend):
    phi = torch.empty(0, 3, 5, 5, device=backend.device)
    residual = torch.empty(0, 2, 5, 5, device=backend.device)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    assert torch.equal(backend.ops.conv_diag_ggn(phi, *geometry).cpu(), torch.zeros(3, 3, 3))
    assert torch.equal(backend.ops.conv_diag_ef(phi, residual, *geometry).cpu(), torch.zeros(2, 3, 3, 3))
    assert torch.equal(backend.ops.conv_patch_gram(phi, *geometry).cpu(), torch.zeros(28, 28))


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(phi=a["phi"][0]), RuntimeError, r"`phi` must have shape \(N, C_in, H, W\)"),
        (lambda a: a.update(phi=a["phi"].long()), RuntimeError, "`phi` must be float16"),
        (lambda a: a.update(kernel_size=[0, 3]), RuntimeError, "`kernel_size` must be >= 1"),
        (lambda a: a.update(kernel_size=[3, 3, 3]), RuntimeError, "`kernel_size` must have 2 entries"),
        (lambda a: a.update(stride=[1, 0]), RuntimeError, "`stride` must be >= 1"),
        (lambda a: a.update(padding=[-1, 0]), RuntimeError, "`padding` must be >= 0"),
        (lambda a: a.update(dilation=[0, 1]), RuntimeError, "`dilation` must be >= 1"),
        (lambda a: a.update(kernel_size=[9, 3]), RuntimeError, "the dilated kernel spans 9x3"),
        (lambda a: a.update(residual=a["residual"][:, :, 1:]), RuntimeError, "`residual` must have shape"),
        (
            lambda a: a.update(residual=a["residual"][0]),
            RuntimeError,
            r"`residual` must have shape \(N, C, H_out",
        ),
        (lambda a: a.update(residual=a["residual"].double()), RuntimeError, "`residual` has dtype"),
    ],
)
def test_errors_name_the_argument(backend, mutate, error, message):
    phi, residual, _ = _inputs((2, 3, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2), torch.float32, backend.device)
    kwargs = {"phi": phi, "residual": residual, "kernel_size": [3, 3]}
    kwargs.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1])
    mutate(kwargs)
    with pytest.raises(error, match=message):
        backend.ops.conv_diag_ef(**kwargs)
    if "residual" not in message:
        kwargs.pop("residual")
        with pytest.raises(error, match=message):
            backend.ops.conv_diag_ggn(**kwargs)
        with pytest.raises(error, match=message):
            backend.ops.conv_patch_gram(**kwargs)


def test_phi_without_channels_is_a_value_error(backend):
    """A head without input channels has no patches: F.unfold (the reference) rejects such a `phi`, and so do
    the ops and their fakes (meta tensors), with a ValueError that names `phi` and the channel count."""
    phi = torch.randn(2, 0, 5, 5, device=backend.device)
    residual = torch.randn(2, 2, 5, 5, device=backend.device)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError):
        reference.conv_diag_ggn(phi.cpu(), *geometry)
    for device in (backend.device, "meta"):
        p, r = phi.to(device), residual.to(device)
        for call in (
            lambda: backend.ops.conv_diag_ggn(p, *geometry),
            lambda: backend.ops.conv_diag_ef(p, r, *geometry),
            lambda: backend.ops.conv_patch_gram(p, *geometry),
        ):
            with pytest.raises(ValueError, match=r"`phi` must have at least one channel \(C_in >= 1\)"):
                call()


def test_mixed_devices_are_named():
    phi = torch.zeros(1, 2, 4, 4)
    residual = torch.empty(1, 3, 4, 4, device="meta")
    with pytest.raises(RuntimeError, match="`residual` is on meta"):
        torch.ops.bayesdiff_ext.conv_diag_ef(phi, residual, [1, 1], [1, 1], [0, 0], [1, 1])


def test_wrappers_take_ints_and_pairs():
    phi, residual, _ = _inputs((2, 3, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2), torch.float64, "cpu")
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1])
    torch.testing.assert_close(
        ops.conv_diag_ggn(phi, 3, stride=2, padding=1), reference.conv_diag_ggn(phi, *geometry)
    )
    torch.testing.assert_close(
        ops.conv_patch_gram(phi, (3, 3), stride=(2, 2), padding=(1, 1), dilation=1),
        reference.conv_patch_gram(phi, *geometry),
    )
    weight_part, bias_part = ops.conv_diag_ef(phi, residual, 3, stride=2, padding=1, with_bias=True)
    torch.testing.assert_close(weight_part, reference.conv_diag_ef(phi, residual, *geometry))
    torch.testing.assert_close(bias_part, (residual.sum((2, 3)) ** 2).sum(0))
    with pytest.raises(ValueError, match="`stride` must be an int or a pair"):
        ops.conv_diag_ggn(phi, 3, stride=(1, 1, 1))


@pytest.mark.parametrize("namespace", ["bayesdiff_ext", "bayesdiff_ext_emu"])
def test_opcheck(namespace):
    lib = emulation.load() if namespace.endswith("emu") else torch.ops.bayesdiff_ext
    for case, dtype in [
        ((2, 3, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2), torch.float32),
        ((1, 2, 9, 5, (1, 3), (2, 1), (0, 1), (1, 2), 3), torch.float64),
        ((1, 2, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.bfloat16),
    ]:
        phi, residual, geometry = _inputs(case, dtype, "cpu")
        torch.library.opcheck(lib.conv_diag_ggn, (phi, *geometry))
        torch.library.opcheck(lib.conv_diag_ef, (phi, residual, *geometry))
        torch.library.opcheck(lib.conv_patch_gram, (phi, *geometry))

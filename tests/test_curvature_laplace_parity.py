"""The curvature accumulators against laplace-torch 0.3's fitted curvature of a Conv2d head and of
a Linear head on tokens.

The head is the whole model, ``Sequential(conv or Linear, Flatten)`` on precomputed features
(laplace-torch's last-layer mode takes only Linear heads on flat features), likelihood='regression',
fitted from a DataLoader with uneven batches. Conventions pinned here (and in curvature_layout's docstring): GGN diagonal ×1,
EF diagonal ×2, full GGN = I_C ⊗ A_aug in laplace's [vec(W); b] order, KFAC factors as
``laplace_kron_factors`` states them, bias a separate Kronecker block.
"""

import copy
import warnings

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import ops
from bayesdiff_ext.posterior import curvature_layout as layout

# (C_in, C_out, H, W, kernel_size, stride, padding, dilation)
GEOMETRIES = [
    pytest.param((3, 2, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1)), id="3x3-pad1"),
    pytest.param((2, 3, 9, 8, (3, 2), (2, 1), (0, 1), (2, 1)), id="stride2-dilation2-pad0"),
    pytest.param((4, 2, 5, 7, (1, 1), (1, 1), (0, 0), (1, 1)), id="1x1"),
]
N_IMAGES = 5
BATCH_SIZE = 2  # batches of 2, 2 and 1


class Problem:
    """A random conv head, its features and regression targets, and the accumulators' inputs."""

    def __init__(self, geometry):
        c_in, c_out, h, w, kernel, stride, padding, dilation = geometry
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation).double()
        self.geometry = {"stride": stride, "padding": padding, "dilation": dilation}
        self.kernel = kernel
        self.phi = torch.randn(N_IMAGES, c_in, h, w, dtype=torch.float64)
        with torch.no_grad():
            out = self.conv(self.phi)
        self.out_shape = out.shape
        self.targets = torch.randn(out.flatten(1).shape, dtype=torch.float64)
        self.residual = out - self.targets.view(out.shape)
        self.positions = out.shape[2] * out.shape[3]

    def fitted(self, laplace_class, backend, **kwargs):
        # A fresh copy per fit: BackPack extends the modules it sees in place.
        model = nn.Sequential(copy.deepcopy(self.conv), nn.Flatten())
        loader = DataLoader(TensorDataset(self.phi, self.targets), batch_size=BATCH_SIZE)
        la = laplace_class(model, "regression", backend=backend, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.fit(loader)
        return la

    def gram(self):
        return ops.conv_patch_gram(self.phi, self.kernel, **self.geometry)


@pytest.fixture(autouse=True)
def _float64_default():
    """laplace-torch's CurvlinopsGGN.full multiplies by an identity of the *default* dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("backend", [BackPackGGN, CurvlinopsGGN])
def test_diag_ggn_is_laplace_diag_H(geometry, backend):
    problem = Problem(geometry)
    la = problem.fitted(DiagLaplace, backend)
    ggn = ops.conv_diag_ggn(problem.phi, problem.kernel, **problem.geometry)
    expected = layout.diag_ggn_flat(ggn, N_IMAGES * problem.positions, problem.out_shape[1])
    _assert_close(la.H, expected)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("backend", [BackPackEF, CurvlinopsEF])
def test_diag_ef_is_half_of_laplace_diag_H(geometry, backend):
    problem = Problem(geometry)
    la = problem.fitted(DiagLaplace, backend)
    weight_part, bias_part = ops.conv_diag_ef(
        problem.phi, problem.residual, problem.kernel, **problem.geometry, with_bias=True
    )
    _assert_close(la.H, 2 * layout.join_flat(weight_part, bias_part))


# BackPack's full GGN costs one backward pass per output (C·H_out·W_out): its own small case.
@pytest.mark.parametrize(
    "geometry, backend",
    [pytest.param(g.values[0], CurvlinopsGGN, id=f"CurvlinopsGGN-{g.id}") for g in GEOMETRIES]
    + [pytest.param((2, 2, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1)), BackPackGGN, id="BackPackGGN-3x3-small")],
)
def test_patch_gram_gives_laplace_full_H(geometry, backend):
    problem = Problem(geometry)
    la = problem.fitted(FullLaplace, backend)
    _assert_close(la.H, layout.full_ggn_from_gram(problem.gram(), problem.out_shape[1]))


KRON_BACKENDS = [(BackPackGGN, "backpack"), (CurvlinopsGGN, "curvlinops")]


# damping=True changes only the decomposition laplace-torch makes of these factors: one geometry.
@pytest.mark.parametrize(
    "geometry, damping",
    [pytest.param(g.values[0], False, id=g.id) for g in GEOMETRIES]
    + [pytest.param(GEOMETRIES[0].values[0], True, id=f"{GEOMETRIES[0].id}-damping")],
)
@pytest.mark.parametrize("backend, name", KRON_BACKENDS, ids=[name for _, name in KRON_BACKENDS])
def test_patch_gram_gives_laplace_kron_factors(geometry, backend, name, damping):
    problem = Problem(geometry)
    la = problem.fitted(KronLaplace, backend, damping=damping)
    (weight_out, weight_in), (bias_factor,) = la.H_facs.kfacs
    (g, a), (g_b,) = layout.laplace_kron_factors(problem.gram(), problem.out_shape[1], N_IMAGES, name)
    _assert_close(weight_out, g)
    _assert_close(weight_in, a)
    _assert_close(bias_factor, g_b)
    # What the factors mean: the exact weight GGN I_C ⊗ A_D, P times over for BackPack's KFLR.
    gram = problem.gram()
    exact = torch.kron(torch.eye(problem.out_shape[1], dtype=torch.float64), gram[:-1, :-1])
    scale = problem.positions if name == "backpack" else 1
    _assert_close(torch.kron(weight_out, weight_in), scale * exact)


def test_layout_round_trip():
    out_channels, patch_size = 3, 4
    flat = torch.arange(out_channels * (patch_size + 1), dtype=torch.float64)
    blocks = layout.flat_to_channel_blocks(flat, out_channels, patch_size)
    # channel 1's block: its weight row (entries 4..7), then its bias (entry 12 + 1).
    assert blocks[5:10].tolist() == [4, 5, 6, 7, 13]
    assert torch.equal(layout.channel_blocks_to_flat(blocks, out_channels, patch_size), flat)
    matrix = torch.randn(15, 15, dtype=torch.float64)
    back = layout.channel_blocks_to_flat(
        layout.flat_to_channel_blocks(matrix, out_channels, patch_size), out_channels, patch_size
    )
    assert torch.equal(back, matrix)
    weight, bias = layout.split_flat(flat, (out_channels, 2, 2, 1))
    assert weight.shape == (3, 2, 2, 1) and bias.tolist() == [12, 13, 14]
    with pytest.raises(ValueError, match="`flat` must have shape"):
        layout.split_flat(flat[1:], (out_channels, 2, 2, 1))


class LinearProblem:
    """A random Linear head on tokens (N, T, D), as laplace-torch sees it: Sequential(Linear,
    Flatten) with targets (N, T·C), so one sample is one image and all of its tokens."""

    def __init__(self, tokens=4, features=3, outputs=2):
        self.linear = nn.Linear(features, outputs).double()
        self.phi = torch.randn(N_IMAGES, tokens, features, dtype=torch.float64)
        with torch.no_grad():
            out = self.linear(self.phi)
        self.targets = torch.randn(out.flatten(1).shape, dtype=torch.float64)
        self.residual = out - self.targets.view(out.shape)
        self.outputs = outputs

    def fitted(self, laplace_class, backend):
        model = nn.Sequential(copy.deepcopy(self.linear), nn.Flatten())
        loader = DataLoader(TensorDataset(self.phi, self.targets), batch_size=BATCH_SIZE)
        la = laplace_class(model, "regression", backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.fit(loader)
        return la


@pytest.mark.parametrize("backend", [BackPackGGN, CurvlinopsGGN])
def test_linear_diag_ggn_is_laplace_diag_H(backend):
    problem = LinearProblem()
    la = problem.fitted(DiagLaplace, backend)
    rows = problem.phi.shape[0] * problem.phi.shape[1]
    _assert_close(la.H, layout.diag_ggn_flat(ops.linear_diag_ggn(problem.phi), rows, problem.outputs))


@pytest.mark.parametrize("backend", [BackPackEF, CurvlinopsEF])
def test_linear_diag_ef_is_half_of_laplace_diag_H(backend):
    problem = LinearProblem()
    la = problem.fitted(DiagLaplace, backend)
    weight_part, bias_part = ops.linear_diag_ef(problem.phi, problem.residual, with_bias=True)
    _assert_close(la.H, 2 * layout.join_flat(weight_part, bias_part))


def test_linear_gram_gives_laplace_full_H():
    problem = LinearProblem()
    la = problem.fitted(FullLaplace, CurvlinopsGGN)
    _assert_close(la.H, layout.full_ggn_from_gram(ops.linear_gram(problem.phi), problem.outputs))

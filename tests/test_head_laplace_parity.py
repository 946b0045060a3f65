"""The fused head ops against laplace-torch 0.3's GLM predictive, and against Monte Carlo.

Conventions that parity needed (all float64, tiny shapes):
* A conv head is fitted as the whole model ``Sequential(conv, Flatten)`` (laplace-torch's
  last-layer mode accepts only Linear heads). Flatten of NCHW orders the K = C·H·W outputs as
  k = c·H·W + p, so the ops' NCHW outputs compare after ``.flatten(1)``.
* Parameters are laplace-torch's ``parameters_to_vector`` order: vec(W) row-major (per channel
  the ``weight.flatten(1)`` order), then b (``laplace_convert``).
* The predictive needs no ×2 for the EF backends: ``posterior_variance`` already holds laplace's
  EF convention (2× the squared per-sample gradients); the ops are fed the posterior as it is.
* KronLaplace(damping=True) predicts with the *undamped* inverse in 0.3: ``la.H`` is damped but
  ``la.posterior_precision`` (H·s + δ) drops the flag. The damped formula is checked separately
  against laplace-torch's own ``KronDecomposed(damping=True)``.
"""

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN
from laplace.utils.matrix import KronDecomposed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import ops
from bayesdiff_ext.posterior import laplace_convert
from bayesdiff_ext.posterior.curvature_layout import flat_to_channel_blocks

# BackPack's hooks warn on every backward of a model whose inputs need no gradient.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

BATCH, IN_CHANNELS, CHANNELS, SIZE = 2, 3, 2, 5
SIGMA, PRIOR = 0.7, 2.0
HEADS = {
    "3x3-padding1-bias": dict(kernel_size=3, padding=1, bias=True),
    "3x3-stride2-no-bias": dict(kernel_size=3, stride=2, bias=False),
}
# Every operand is float64; the ops and laplace-torch sum in different orders.
RTOL = 1e-10


def _conv_head(config) -> nn.Conv2d:
    torch.manual_seed(1)
    return nn.Conv2d(IN_CHANNELS, CHANNELS, dtype=torch.float64, **config)


def _loader(model: nn.Module, inputs: torch.Tensor) -> DataLoader:
    with torch.no_grad():
        targets = model(inputs) + 0.3 * torch.randn_like(model(inputs))
    return DataLoader(TensorDataset(inputs, targets), batch_size=4)


def _fitted(cls, head: nn.Module, **kwargs):
    model = nn.Sequential(head, nn.Flatten())
    train = torch.randn(8, IN_CHANNELS, SIZE, SIZE, dtype=torch.float64)
    la = cls(model, "regression", sigma_noise=SIGMA, prior_precision=PRIOR, **kwargs)
    la.fit(_loader(model, train))
    return la


def _glm(la, x: torch.Tensor):
    """laplace-torch's GLM predictive: mean (B, K) and the diagonal of the (B, K, K) covariance."""
    f_mu, f_var = la(x, pred_type="glm")
    return f_mu, torch.diagonal(f_var, dim1=-2, dim2=-1)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor):
    torch.testing.assert_close(ours.flatten(1), theirs, rtol=RTOL, atol=RTOL * float(theirs.abs().max()))


def _features() -> torch.Tensor:
    return torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE, dtype=torch.float64)


@pytest.mark.parametrize("backend", [BackPackEF, BackPackGGN, CurvlinopsGGN, CurvlinopsEF], ids=lambda b: b.__name__)
@pytest.mark.parametrize("config", HEADS.values(), ids=HEADS.keys())
def test_diag_laplace_matches_conv_head_mean_var(backend, config):
    """diag(functional_variance) of DiagLaplace == conv_head_mean_var fed ``posterior_variance``
    split into the shapes of W and b; the GLM mean is the head's forward."""
    head = _conv_head(config)
    la = _fitted(DiagLaplace, head, backend=backend)
    x = _features()
    f_mu, f_var = _glm(la, x)
    mean, var = ops.conv_head_mean_var(x, **laplace_convert.diag_from_laplace(la, head))
    _assert_close(mean, f_mu)
    _assert_close(var, f_var)


@pytest.mark.parametrize("backend", [CurvlinopsGGN, BackPackGGN], ids=lambda b: b.__name__)
@pytest.mark.parametrize("config", HEADS.values(), ids=HEADS.keys())
def test_full_ggn_laplace_matches_factored_op(backend, config):
    """laplace-torch's full GGN is I_C ⊗ A_aug (identical per-channel blocks, no cross-channel
    terms), so its posterior covariance shares one Cholesky factor L across channels and the
    factored op with q_r = columns of L (R = D+1 with a bias) and mix = 1 gives its variance."""
    head = _conv_head(config)
    la = _fitted(FullLaplace, head, backend=backend)
    taps = head.weight[0].numel()
    has_bias = head.bias is not None
    block = taps + has_bias
    if has_bias:
        blocks = flat_to_channel_blocks(la.H, CHANNELS, taps)
    else:
        blocks = la.H
    expected = torch.block_diag(*[blocks[:block, :block]] * CHANNELS)
    torch.testing.assert_close(blocks, expected, rtol=1e-12, atol=1e-12 * float(la.H.abs().max()))

    inputs = laplace_convert.full_from_laplace(la, head)
    assert inputs["proj_weight"].shape[0] == block and bool((inputs["mix"] == 1).all())
    x = _features()
    _, f_var = _glm(la, x)
    _assert_close(ops.conv_head_var_factored(x, **inputs), f_var)


def test_full_ef_laplace_uses_per_channel_factors():
    """The full EF has cross-channel terms and unequal channel blocks: only a channel's own block
    enters its variance, so the factored op takes one factor per channel (R = C·(D+1))."""
    head = _conv_head(HEADS["3x3-padding1-bias"])
    la = _fitted(FullLaplace, head, backend=CurvlinopsEF)
    inputs = laplace_convert.full_from_laplace(la, head)
    assert inputs["proj_weight"].shape[0] == CHANNELS * (head.weight[0].numel() + 1)
    x = _features()
    _, f_var = _glm(la, x)
    _assert_close(ops.conv_head_var_factored(x, **inputs), f_var)


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("backend", [CurvlinopsGGN, BackPackGGN], ids=lambda b: b.__name__)
@pytest.mark.parametrize("config", HEADS.values(), ids=HEADS.keys())
def test_kron_laplace_matches_factored_op(backend, config, damping):
    """KFAC (G ⊗ A for W, G_b for b): directions = eigenvectors of A, mix from the eigenvalues
    (docs/MATH.md §1.1). With damping=True laplace-torch 0.3 still predicts undamped (see module doc)."""
    head = _conv_head(config)
    la = _fitted(KronLaplace, head, backend=backend, damping=damping)
    assert la.H.damping == damping and la.posterior_precision.damping is False
    x = _features()
    _, f_var = _glm(la, x)
    inputs = laplace_convert.kron_from_laplace(la, head)
    _assert_close(ops.conv_head_var_factored(x, **inputs), f_var)


def test_damped_kron_formula_matches_laplace_kron_decomposed():
    head = _conv_head(HEADS["3x3-padding1-bias"])
    la = _fitted(KronLaplace, head, backend=CurvlinopsGGN, damping=True)
    precision = la.posterior_precision
    damped = KronDecomposed(precision.eigenvectors, precision.eigenvalues, precision.deltas, damping=True)
    x = _features()
    jacobians, _ = la.backend.jacobians(x)
    expected = torch.diagonal(damped.inv_square_form(jacobians), dim1=-2, dim2=-1).detach()
    inputs = laplace_convert.factored_from_kron(
        precision.eigenvectors, precision.eigenvalues, precision.deltas, tuple(head.weight.shape), True, damping=True
    )
    var = ops.conv_head_var_factored(x, **inputs, padding=1)
    _assert_close(var, expected)
    undamped = laplace_convert.factored_from_kron(
        precision.eigenvectors, precision.eigenvalues, precision.deltas, tuple(head.weight.shape), True
    )
    assert not torch.allclose(ops.conv_head_var_factored(x, **undamped, padding=1), var)


def test_linear_head_matches_last_layer_diag_laplace():
    """A Linear head under laplace-torch's own last-layer mode (DiagLLLaplace): the GLM predictive
    equals linear_head_mean_var on the penultimate features."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    train = torch.randn(16, 4, dtype=torch.float64)
    la = Laplace(
        model, "regression", subset_of_weights="last_layer", hessian_structure="diag", sigma_noise=SIGMA,
        prior_precision=PRIOR,
    )
    la.fit(_loader(model, train))
    x = torch.randn(5, 4, dtype=torch.float64)
    f_mu, f_var = _glm(la, x)
    with torch.no_grad():
        phi = model[:-1](x)
    mean, var = ops.linear_head_mean_var(phi, **laplace_convert.diag_from_laplace(la, model[-1]))
    _assert_close(mean, f_mu)
    _assert_close(var, f_var)


MC_SAMPLES = 20_000


@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_closed_form_matches_monte_carlo_over_sampled_weights(structure):
    """BayesDiff's estimator, the spread of the head's output over weights drawn from the
    posterior, converges to the closed form: with n draws the sample variance has standard error
    var·√(2/(n−1)) and the sample mean √(var/n); every pixel must lie within 5 of them."""
    head = _conv_head(HEADS["3x3-padding1-bias"])
    cls, convert, op = {
        "diag": (DiagLaplace, laplace_convert.diag_from_laplace, None),
        "full": (FullLaplace, laplace_convert.full_from_laplace, ops.conv_head_var_factored),
        "kron": (KronLaplace, laplace_convert.kron_from_laplace, ops.conv_head_var_factored),
    }[structure]
    la = _fitted(cls, head, backend=CurvlinopsGGN)
    x = _features()
    inputs = convert(la, head)
    if op is None:
        mean, var = ops.conv_head_mean_var(x, **inputs)
    else:
        with torch.no_grad():
            mean = head(x)
        var = op(x, **inputs)

    samples = la.sample(MC_SAMPLES, generator=torch.Generator().manual_seed(3)).detach()
    weight_numel = head.weight.numel()
    weights = samples[:, :weight_numel].reshape(MC_SAMPLES * CHANNELS, *head.weight.shape[1:])
    outputs = torch.nn.functional.conv2d(x, weights, samples[:, weight_numel:].reshape(-1), padding=1)
    outputs = outputs.reshape(BATCH, MC_SAMPLES, CHANNELS, SIZE, SIZE)
    mc_mean, mc_var = outputs.mean(1), outputs.var(1)

    var_error = (mc_var - var).abs() / (var * (2 / (MC_SAMPLES - 1)) ** 0.5)
    mean_error = (mc_mean - mean).abs() / (var / MC_SAMPLES).sqrt()
    assert float(var_error.max()) < 5 and float(mean_error.max()) < 5

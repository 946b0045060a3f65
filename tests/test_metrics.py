"""Tests of bayesdiff_ext.metrics: each formula against an independent brute force, a closed form
or a peer implementation (torchmetrics), on small random feature sets."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from bayesdiff_ext import metrics
from bayesdiff_ext.metrics import knn_manifold, rbf_mmd


def _features(n, d, seed, shift=0.0):
    """Correlated Gaussian features (n, d): a random linear map of white noise, plus a shift."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


# ------------------------------------------------------------------------------------ Fréchet
def _pytorch_fid_distance(a, b, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (sqrtm of Σ₁Σ₂ with its eps-offset retry)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n_a,n_b,d", [(50, 37, 7), (200, 120, 16), (9, 9, 3)])
def test_frechet_matches_pytorch_fid_formula(n_a, n_b, d):
    a = _features(n_a, d, seed=1)
    b = _features(n_b, d, seed=2, shift=0.4)
    ours = metrics.frechet_distance(a, b)
    assert ours > 0
    assert ours == pytest.approx(_pytorch_fid_distance(a, b), rel=1e-8)
    assert metrics.frechet_distance(b, a) == pytest.approx(ours, rel=1e-10)


def _with_exact_moments(mu, std, n, seed):
    """n samples whose sample mean is mu and whose unbiased sample covariance is diag(std²)."""
    rng = np.random.default_rng(seed)
    centred = rng.normal(size=(n, len(mu)))
    centred -= centred.mean(0)
    q, _ = np.linalg.qr(centred)  # orthonormal columns, still orthogonal to the ones vector
    return q * math.sqrt(n - 1) * std + mu


def test_frechet_closed_form_for_diagonal_gaussians():
    mu1, std1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5, 3.0])
    mu2, std2 = np.array([1.0, 1.0, 0.0, -0.5]), np.array([2.0, 0.5, 0.5, 1.0])
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    a = _with_exact_moments(mu1, std1, 30, seed=3)
    b = _with_exact_moments(mu2, std2, 41, seed=4)
    assert metrics.frechet_distance(a, b) == pytest.approx(closed_form, rel=1e-10)
    from_statistics = metrics.frechet_distance_from_statistics(mu1, np.diag(std1**2), mu2, np.diag(std2**2))
    assert from_statistics == pytest.approx(closed_form, rel=1e-12)


def test_frechet_singular_covariance_fewer_samples_than_features():
    a, b = _features(6, 10, seed=5), _features(8, 10, seed=6, shift=1.0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # torchmetrics' route: Σ √eig(Σ₁Σ₂) (real parts), in float64.
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_frechet_identical_sets_is_zero_and_torch_inputs_match_numpy():
    a = _features(40, 5, seed=7)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)
    b = _features(33, 5, seed=8, shift=0.2)
    # float32, transposed (non-contiguous) torch storage: same values, same result.
    a_t = torch.from_numpy(a.T.astype(np.float32).copy()).t()
    assert not a_t.is_contiguous()
    expected = metrics.frechet_distance(a_t.double().numpy(), b)
    assert metrics.frechet_distance(a_t, torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_errors_name_the_argument():
    a = _features(10, 4, seed=9)
    with pytest.raises(ValueError, match=r"a: expected a feature matrix of shape \(N, d\)"):
        metrics.frechet_distance(a[0], a)
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="b: expected at least 2 rows"):
        metrics.frechet_distance(a, a[:1])
    bad = a.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="b: contains NaN"):
        metrics.frechet_distance(a, bad)
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ------------------------------------------------------------------------------------ KID
def _kid_loop(x, y, degree=3, gamma=None, coef0=1.0):
    """Unbiased MMD² with the polynomial kernel, one pair at a time."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    m = len(x)

    def k(u, v):
        return (gamma * float(np.dot(u, v)) + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


@pytest.mark.parametrize("degree,gamma,coef0", [(3, None, 1.0), (2, 0.3, 0.5)])
def test_kid_full_sets_match_pairwise_loop(degree, gamma, coef0):
    a, b = _features(13, 5, seed=10), _features(13, 5, seed=11, shift=0.5)
    # subset_size = N: every subset is the whole set, so the mean is that MMD² and the std is 0.
    mean, std = metrics.kid(a, b, subsets=3, subset_size=13, degree=degree, gamma=gamma, coef0=coef0)
    assert mean == pytest.approx(_kid_loop(a, b, degree, gamma, coef0), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_match_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _features(30, 6, seed=12), _features(35, 6, seed=13, shift=0.3)
    identity = metrics.FeatureModule(nn.Flatten(), num_features=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID will save all extracted features"
        tm = KernelInceptionDistance(feature=identity, subsets=5, subset_size=20)
    tm.update(torch.from_numpy(real), real=True)
    tm.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(123)
    tm_mean, tm_std = tm.compute()
    mean, std = metrics.kid(real, fake, subsets=5, subset_size=20, seed=123)
    assert std > 0  # the subsets differ, so this also checks that they are the same subsets
    assert mean == pytest.approx(tm_mean.item(), rel=1e-9)
    assert std == pytest.approx(tm_std.item(), rel=1e-9)


def test_kid_seed_generator_and_errors():
    a, b = _features(25, 4, seed=14), _features(22, 4, seed=15)
    first = metrics.kid(a, b, subsets=4, subset_size=10, seed=7)
    assert metrics.kid(a, b, subsets=4, subset_size=10, seed=7) == first
    assert metrics.kid(a, b, subsets=4, subset_size=10, generator=torch.Generator().manual_seed(7)) == first
    assert metrics.kid(a, b, subsets=4, subset_size=10, seed=8) != first
    # The default subset size is min(1000, N_a, N_b) = 22.
    assert metrics.kid(a, b, subsets=2) == metrics.kid(a, b, subsets=2, subset_size=22)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kid(a, b, subset_size=23)
    with pytest.raises(ValueError, match="either seed or generator"):
        metrics.kid(a, b, seed=1, generator=torch.Generator())


# ------------------------------------------------------------------------------------ CMMD
def _cmmd_loop(x, y, sigma=10.0, scale=1000.0):
    """The google-research/cmmd formula, one pair at a time: normalise, RBF, V-statistic × scale."""
    x = [v / np.linalg.norm(v) for v in x]
    y = [v / np.linalg.norm(v) for v in y]

    def mean_k(p, q):
        return sum(math.exp(-np.sum((u - v) ** 2) / (2 * sigma**2)) for u in p for v in q) / (len(p) * len(q))

    return scale * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


@pytest.mark.parametrize("sigma", [10.0, 0.7])
def test_cmmd_matches_pairwise_loop(sigma):
    a, b = _features(11, 5, seed=16), _features(9, 5, seed=17, shift=0.8)
    assert metrics.cmmd(a, b, sigma=sigma) == pytest.approx(_cmmd_loop(a, b, sigma), rel=1e-9)


def test_cmmd_properties():
    a = _features(20, 6, seed=18)
    assert metrics.cmmd(a, a) == 0.0
    shifted = metrics.cmmd(a, _features(20, 6, seed=18, shift=1.0))
    assert shifted > 0
    # Only directions count: rescaling rows by positive factors changes nothing.
    row_scales = np.random.default_rng(19).uniform(0.1, 10.0, size=(20, 1))
    b = _features(15, 6, seed=20, shift=0.5)
    assert metrics.cmmd(a * row_scales, b) == pytest.approx(metrics.cmmd(a, b), rel=1e-10)
    assert metrics.cmmd(a, b, scale=1.0) == pytest.approx(metrics.cmmd(a, b) / 1000.0, rel=1e-12)


def test_cmmd_blocks_sum_like_one_matrix(monkeypatch):
    a, b = _features(17, 4, seed=21), _features(10, 4, seed=22, shift=0.3)
    whole = metrics.cmmd(a, b)
    monkeypatch.setattr(rbf_mmd, "_BLOCK_ROWS", 4)  # 17 rows: four full blocks and a tail of 1
    assert metrics.cmmd(a, b) == pytest.approx(whole, rel=1e-12)


# ------------------------------------------------------------------------------------ PRDC
def _prdc_brute_force(real, fake, k):
    """Naeem et al.'s definitions with explicit pairwise differences and loops."""
    def dist(p, q):
        return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))

    d_rr, d_ff, d_rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_real = np.array([np.sort(row)[k] for row in d_rr])  # row includes the point itself (0)
    r_fake = np.array([np.sort(row)[k] for row in d_ff])
    n, m = len(real), len(fake)
    precision = np.mean([any(d_rf[i, j] < r_real[i] for i in range(n)) for j in range(m)])
    recall = np.mean([any(d_rf[i, j] < r_fake[j] for j in range(m)) for i in range(n)])
    density = sum(d_rf[i, j] < r_real[i] for i in range(n) for j in range(m)) / (k * m)
    coverage = np.mean([min(d_rf[i]) < r_real[i] for i in range(n)])
    return precision, recall, density, coverage


def test_prdc_hand_checked_line():
    # Reals 0,1,2,3,6 have 1-NN radii 1,1,1,1,3; fakes 0.5,3.2,10,10.5 have radii 2.7,2.7,0.5,0.5.
    real = np.array([[0.0], [1.0], [2.0], [3.0], [6.0]])
    fake = np.array([[0.5], [3.2], [10.0], [10.5]])
    p, r, d, c = metrics.prdc(real, fake, k=1)
    assert p == pytest.approx(2 / 4)  # 0.5 (balls of 0, 1) and 3.2 (balls of 3, 6) are covered
    assert r == pytest.approx(4 / 5)  # 6 is 2.8 from 3.2, outside its radius 2.7
    assert d == pytest.approx(4 / 4)  # four real balls hold a fake: 0, 1 (0.5) and 3, 6 (3.2)
    assert c == pytest.approx(4 / 5)  # 2's nearest fake (3.2) is 1.2 away, outside radius 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k):
    real, fake = _features(40, 6, seed=23), _features(33, 6, seed=24, shift=0.4)
    assert tuple(metrics.prdc(real, fake, k=k)) == pytest.approx(_prdc_brute_force(real, fake, k), rel=1e-12)


def test_prdc_blocks_and_identical_sets(monkeypatch):
    real, fake = _features(23, 3, seed=25), _features(19, 3, seed=26, shift=0.2)
    whole = metrics.prdc(real, fake, k=3)
    monkeypatch.setattr(knn_manifold, "_BLOCK_ENTRIES", 50)  # 2 rows per block, with tails
    assert metrics.prdc(real, fake, k=3) == whole
    same = metrics.prdc(real, real, k=3)
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    assert same.density == pytest.approx(_prdc_brute_force(real, real, 3)[2])


def test_prdc_errors():
    real, fake = _features(5, 2, seed=27), _features(8, 2, seed=28)
    with pytest.raises(ValueError, match="k: must be smaller than both set sizes"):
        metrics.prdc(real, fake, k=5)
    with pytest.raises(ValueError, match="fake: expected a feature matrix"):
        metrics.prdc(real, fake[None], k=2)


# ------------------------------------------------------------------------------------ Inception Score
def test_inception_score_uniform_is_one_and_balanced_one_hot_is_class_count():
    assert tuple(metrics.inception_score(np.full((40, 7), 1 / 7), splits=4)) == pytest.approx((1.0, 0.0))
    labels = np.arange(60) % 6
    one_hot = np.eye(6)[labels]  # every split of 6 consecutive rows holds each class once
    assert tuple(metrics.inception_score(one_hot, splits=10)) == pytest.approx((6.0, 0.0))
    # Sorted by class, each split sees a single class: no diversity, score 1.
    assert tuple(metrics.inception_score(np.eye(6)[np.sort(labels)], splits=6)) == pytest.approx((1.0, 0.0))


def test_inception_score_matches_loop_definition():
    probs = np.random.default_rng(29).dirichlet(np.full(5, 0.3), size=53)
    splits = 4
    scores = []
    for i in range(splits):
        part = probs[i * 53 // splits : (i + 1) * 53 // splits]
        marginal = part.mean(0)
        kls = [sum(p * math.log(p / q) for p, q in zip(row, marginal) if p > 0) for row in part]
        scores.append(math.exp(sum(kls) / len(kls)))
    mean, std = metrics.inception_score(torch.from_numpy(probs), splits=splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-10)
    assert std > 0


def test_inception_score_errors():
    with pytest.raises(ValueError, match="negative entries"):
        metrics.inception_score(np.array([[1.5, -0.5], [0.5, 0.5]]), splits=1)
    with pytest.raises(ValueError, match="must sum to 1"):
        metrics.inception_score(np.array([[0.2, 0.2], [0.5, 0.5]]), splits=1)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.full((3, 2), 0.5), splits=4)


# ------------------------------------------------------------------------------------ extractors
class _TinyClassifier(nn.Module):
    """features(x) is the embedding; forward(x) gives logits, which the metrics must not use."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def test_extract_features_batches_eval_mode_and_numpy_input():
    model = _TinyClassifier().train()
    images = torch.randn(23, 1, 8, 8)
    got = metrics.extract_features(model, images.numpy().astype(np.float64), batch_size=5)
    assert got.dtype == np.float64 and got.shape == (23, 4 * 6 * 6)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        expected = model.features(images).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)  # dropout off: eval mode was used


def test_extract_features_errors():
    with pytest.raises(ValueError, match=r"expected \(N, d\)"):
        metrics.extract_features(nn.Identity(), torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match="device"):
        metrics.extract_features(_TinyClassifier(), torch.randn(2, 1, 8, 8), device="meta")
    with pytest.raises(ValueError, match="images: expected a non-empty batch"):
        metrics.extract_features(_TinyClassifier(), torch.randn(0, 1, 8, 8))


def test_random_conv_features_are_a_function_of_the_seed():
    net = metrics.RandomConvFeatures(in_channels=1, dim=16, seed=0)
    # The documented construction: float64 uniforms u from torch.Generator().manual_seed(0),
    # weight = (2u − 1)·√(6/fan_in). Pinning u pins the weights on every machine.
    u = np.array([0.9700530018065531, 0.707819864399788, 0.45938294312745087])
    expected = ((2 * u - 1) * math.sqrt(6 / 9)).astype(np.float32)
    np.testing.assert_array_equal(net.conv1.weight.flatten()[:3].numpy(), expected)
    again = metrics.RandomConvFeatures(in_channels=1, dim=16, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), again.state_dict().values()))
    other = metrics.RandomConvFeatures(in_channels=1, dim=16, seed=1)
    assert not torch.equal(net.conv1.weight, other.conv1.weight)
    x = torch.randn(5, 1, 11, 13)
    feats = net(x)
    assert feats.shape == (5, 16) and net.num_features == 16
    assert torch.equal(feats, net.features(x)) and not feats.requires_grad
    with pytest.raises(ValueError, match=r"x: expected images of shape \(N, 1, H, W\)"):
        net(torch.randn(5, 3, 8, 8))


def test_load_feature_module_torchscript_and_state_dicts(tmp_path):
    from safetensors.torch import save_file

    source = metrics.RandomConvFeatures(in_channels=1, dim=8, seed=3)
    x = torch.randn(4, 1, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(source).save(str(tmp_path / "net.pt"))
    scripted = metrics.load_feature_module(tmp_path / "net.pt")
    torch.testing.assert_close(scripted(x), source(x))

    torch.save(source.state_dict(), tmp_path / "net_state.pt")
    save_file(source.state_dict(), str(tmp_path / "net.safetensors"))
    for name in ("net_state.pt", "net.safetensors"):
        loaded = metrics.load_feature_module(
            tmp_path / name, module=lambda: metrics.RandomConvFeatures(in_channels=1, dim=8, seed=99)
        )
        torch.testing.assert_close(loaded(x), source(x))
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        metrics.load_feature_module(tmp_path / "inception.pt")
    with pytest.raises(ValueError, match="not a TorchScript archive; to load a state dict pass module="):
        metrics.load_feature_module(tmp_path / "net_state.pt")


def test_feature_module_adapter():
    adapter = metrics.FeatureModule(_TinyClassifier(), num_features=144)
    out = adapter(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 144) and isinstance(adapter, metrics.FeatureExtractor)
    with pytest.raises(ValueError, match="pass num_features=d explicitly"):
        metrics.FeatureModule(_TinyClassifier())
    with pytest.raises(ValueError, match="expected num_features = 10"):
        metrics.FeatureModule(_TinyClassifier(), num_features=10)(torch.randn(3, 1, 8, 8))


def _torchmetrics_fid(feature_module, real, fake, batch_size):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature_module)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            fid.update(images[start : start + batch_size], real=is_real)
    return fid.compute().item()


def test_frechet_distance_equals_torchmetrics_fid_with_random_conv_features():
    net = metrics.RandomConvFeatures(in_channels=1, dim=12, seed=0)
    real = torch.randn(48, 1, 16, 16)
    fake = 0.7 * torch.randn(40, 1, 16, 16) + 0.2
    ours = metrics.frechet_distance(
        metrics.extract_features(net, real, batch_size=16), metrics.extract_features(net, fake, batch_size=16)
    )
    assert ours > 0
    assert ours == pytest.approx(_torchmetrics_fid(net, real, fake, batch_size=16), rel=1e-5)


def test_digits_feature_extractor(tmp_path):
    from safetensors.torch import save_file

    from bayesdiff_ext.digits import DigitsClassifier

    with pytest.raises(FileNotFoundError, match="classifier"):
        metrics.digits_feature_extractor(root=tmp_path)

    classifier = DigitsClassifier(channels=(4, 8), feature_dim=10)
    save_file(classifier.state_dict(), str(tmp_path / "classifier.safetensors"))
    (tmp_path / "classifier_config.json").write_text(
        '{"channels": [4, 8], "feature_dim": 10, "num_classes": 10, "in_channels": 1}'
    )
    extractor = metrics.digits_feature_extractor(root=tmp_path)
    assert extractor.num_features == 10
    real, fake = torch.rand(30, 1, 16, 16) * 2 - 1, torch.rand(26, 1, 16, 16) * 1.6 - 0.9
    with torch.no_grad():
        torch.testing.assert_close(extractor(real), classifier.features(real))
    ours = metrics.frechet_distance(
        metrics.extract_features(extractor, real, batch_size=10),
        metrics.extract_features(extractor, fake, batch_size=10),
    )
    assert ours == pytest.approx(_torchmetrics_fid(extractor, real, fake, batch_size=10), rel=1e-5)

"""The evaluation's score registry, the feature-space entropy, the rank mean and the report's goal."""

import math

import numpy as np
import pytest
import torch

from bayesdiff_ext.evaluation import EvaluationConfig
from bayesdiff_ext.evaluation.report import GOAL_AUROC, assemble
from bayesdiff_ext.evaluation.scores import SCORES, Score, register, scored_prefix
from bayesdiff_ext.evaluation.sources import Derived
from bayesdiff_ext.methods.feature_entropy import feature_entropy, gaussian_entropy


def test_every_score_is_one_registered_object_with_a_unique_name():
    names = [score.name for score in SCORES]
    assert len(names) == len(set(names))
    config = EvaluationConfig()
    for score in SCORES:
        assert isinstance(score.label(config), str) and score.label(config)
    with pytest.raises(ValueError, match="registered already"):
        register(Score("x0_drift", lambda c: "again", SCORES[0].source))
    # The derived scores name only registered parts.
    for score in SCORES:
        if isinstance(score.source, Derived):
            assert set(score.source.parts) <= set(names)


def test_gaussian_entropy_is_the_closed_form_and_ranks_independently_of_the_feature_scale():
    rng = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, 3, generator=rng, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0])
    variance = features.var(dim=0)
    tau = 1e-6 * features.pow(2).mean(dim=(0, 2))
    expected = 0.5 * torch.log(2 * math.pi * math.e * (variance + tau[:, None])).sum(dim=1)
    torch.testing.assert_close(gaussian_entropy(features), expected)
    scaled = gaussian_entropy(features * 7.0)
    torch.testing.assert_close(scaled - gaussian_entropy(features), torch.full((5,), 3 * math.log(7.0), dtype=torch.float64))
    # A feature that never moves does not send the entropy to −∞.
    still = torch.ones(4, 2, 3, dtype=torch.float64)
    assert gaussian_entropy(still).isfinite().all()
    with pytest.raises(ValueError, match="M >= 2"):
        gaussian_entropy(torch.zeros(1, 2, 3))


def test_feature_entropy_reads_the_images_through_the_extractor():
    from bayesdiff_ext.metrics import RandomConvFeatures

    extractor = RandomConvFeatures(in_channels=3, seed=0)
    base = torch.randn(1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    spread = torch.tensor([0.01, 1.0]).view(1, 2, 1, 1, 1)
    samples = base + spread * torch.randn(4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    entropy = feature_entropy(samples, extractor)
    assert entropy.shape == (2,) and entropy[1] > entropy[0]


def test_rank_mean_averages_ranks_over_the_images_every_part_scored():
    combine = next(s for s in SCORES if s.name == "drift_and_weights").source.combine
    config = EvaluationConfig(num_images=12, progress=False)
    drift = np.arange(12.0)
    weights = np.full(12, np.nan)
    weights[:6] = [6.0, 5, 4, 3, 2, 1]
    out = combine({"x0_drift": drift, "weight_samples": weights}, config)
    assert scored_prefix(out) == 6
    np.testing.assert_allclose(out[:6], np.full(6, 3.5 / 6))


def _summary(model, aurocs, fids):
    return {
        "model": model,
        "description": f"the {model} model",
        "oracle": "realism",
        "num_images": 100,
        "scores": {
            name: {"label": f"score {name}", "auroc": a, "auroc_std": 0.02, "fid_sigma": f}
            for name, a, f in zip(("a", "b"), aurocs, fids)
        },
    }


def test_the_goal_is_met_only_by_one_score_on_every_model_else_the_best_of_each_and_the_gap():
    section = "<!-- BEGIN generated section: digits -->\nbody\n<!-- END generated section: digits -->"
    both = assemble(None, "photos", section.replace("digits", "photos"), {})
    met = assemble(both, "digits", section, {"digits": _summary("digits", (0.85, 0.6), (3.5, 1.0)),
                                             "photos": _summary("photos", (0.81, 0.9), (4.0, -1.0))})
    assert "**AUROC: met** on every model — score a: digits 0.850, photos 0.810." in met
    assert "**FID: met** on every model — score a" in met
    missed = assemble(both, "digits", section, {"digits": _summary("digits", (0.85, 0.6), (1.0, 3.5)),
                                                "photos": _summary("photos", (0.6, 0.9), (4.0, -1.0))})
    assert "**AUROC: not met** by any one score on every model" in missed
    assert f"on digits score a meets it (0.850)" in missed and "on photos score b meets it (0.900)" in missed
    low = assemble(None, "digits", section, {"digits": _summary("digits", (0.7, 0.6), (1.0, 2.5))})
    assert f"the best is score a (0.700, {GOAL_AUROC - 0.7:.3f} short)" in low
    assert "score b (+2.5σ, 0.5σ short)" in low


def test_sections_of_other_models_are_kept_when_one_is_rendered_again():
    first = "<!-- BEGIN generated section: photos -->\nphotos v1\n<!-- END generated section: photos -->"
    text = assemble(None, "photos", first, {})
    digits = "<!-- BEGIN generated section: digits -->\ndigits v1\n<!-- END generated section: digits -->"
    text = assemble(text, "digits", digits, {})
    again = assemble(text, "photos", first.replace("v1", "v2"), {})
    assert again.index("digits v1") < again.index("photos v2") and "photos v1" not in again
    assert again.count("<!-- BEGIN generated section") == 2

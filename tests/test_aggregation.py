import numpy as np
import pytest
import torch

from bayesdiff_ext import aggregation as agg

# Two 1-channel 2x2 maps: image 0 = [[1, 2], [3, 4]], image 1 = [[0, 0], [0, 8]].
TWO_IMAGES = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 8.0]]]])
# One 3x3 map holding 1..9 row by row.
NINE = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)


def values(t):
    return t.tolist()


def test_sum_mean_max_by_hand():
    assert values(agg.aggregate(TWO_IMAGES, "sum")) == [10.0, 8.0]
    assert values(agg.aggregate(TWO_IMAGES, "mean")) == [2.5, 2.0]
    assert values(agg.aggregate(TWO_IMAGES, "max")) == [4.0, 8.0]


def test_scores_are_float64_and_sum_over_channels():
    v = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]], dtype=torch.float16)  # (1, 2, 1, 2)
    s = agg.aggregate(v, "sum")
    assert s.dtype == torch.float64 and values(s) == [16.0]
    assert values(agg.aggregate(v, "mean")) == [4.0]


@pytest.mark.parametrize(
    "q, expected", [(0, [1.0, 0.0]), (50, [2.5, 0.0]), (75, [3.25, 2.0]), (100, [4.0, 8.0])]
)
def test_percentile_by_hand(q, expected):
    # sorted [1,2,3,4] and [0,0,0,8]; position q/100·3, linear between neighbours
    assert values(agg.aggregate(TWO_IMAGES, "percentile", q=q)) == pytest.approx(expected)


def test_percentile_matches_numpy_on_odd_noncontiguous_maps():
    v = torch.rand(3, 5, 7, 2).permute(0, 3, 1, 2)  # (3, 2, 5, 7), not contiguous
    for q in (0.0, 12.5, 33.3, 95.0, 100.0):
        expected = np.percentile(v.double().flatten(1).numpy(), q, axis=1)
        np.testing.assert_allclose(agg.aggregate(v, "percentile", q=q).numpy(), expected, rtol=1e-12)


def test_patch_max_by_hand_with_cut_windows():
    # windows of 2x2 from the top left: [1,2,4,5] -> 3, [3,6] -> 4.5, [7,8] -> 7.5, [9] -> 9
    assert values(agg.aggregate(NINE, "patch_max", patch=2)) == [9.0]
    assert values(agg.aggregate(NINE, "patch_max", patch=1)) == [9.0]
    assert values(agg.aggregate(NINE, "patch_max", patch=3)) == [5.0]
    assert values(agg.aggregate(NINE, "patch_max", patch=10)) == [5.0]  # larger than the image: its mean
    tall = torch.tensor([[[[1.0], [3.0], [8.0]]]])  # (1, 1, 3, 1): windows [1,3] -> 2, [8] -> 8
    assert values(agg.aggregate(tall, "patch_max", patch=2)) == [8.0]


def test_patch_max_averages_channels_in_a_window():
    v = torch.zeros(1, 2, 4, 4)
    v[0, 0, :2, :2] = 4.0  # one channel of the top-left window: (4·4 + 0·4) / 8 = 2
    v[0, 1, 2:, 2:] = 1.0  # bottom-right window: 4 / 8 = 0.5
    assert values(agg.aggregate(v, "patch_max", patch=2)) == [2.0]


def test_masked_mean_by_hand():
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (H, W), broadcast to every image
    assert values(agg.aggregate(TWO_IMAGES, "masked_mean", mask=mask)) == [2.5, 4.0]
    soft = torch.tensor([[3.0, 1.0], [0.0, 0.0]])  # weights normalised: (3·1 + 1·2) / 4
    assert values(agg.aggregate(TWO_IMAGES[:1], "masked_mean", mask=soft)) == [1.25]
    assert values(agg.aggregate(TWO_IMAGES[:1], "masked_mean", mask=100 * soft)) == [1.25]
    per_image = torch.tensor([[[[True, True], [False, False]]], [[[False, False], [False, True]]]])
    assert values(agg.aggregate(TWO_IMAGES, "masked_mean", mask=per_image)) == [1.5, 8.0]
    everywhere = np.ones((1, 1, 2, 2))
    assert values(agg.aggregate(TWO_IMAGES, "masked_mean", mask=everywhere)) == [2.5, 2.0]


def test_masked_mean_rejects_empty_negative_and_misshapen_masks():
    per_image = torch.ones(2, 1, 2, 2)
    per_image[1] = 0
    with pytest.raises(ValueError, match=r"all zero for image\(s\) \[1\]"):
        agg.aggregate(TWO_IMAGES, "masked_mean", mask=per_image)
    with pytest.raises(ValueError, match="non-negative"):
        agg.aggregate(TWO_IMAGES, "masked_mean", mask=-torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"does not broadcast.*\(2, 1, 2, 2\)"):
        agg.aggregate(TWO_IMAGES, "masked_mean", mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        agg.aggregate(TWO_IMAGES, "masked_mean", mask=torch.ones(2, 2, 2, 2))  # would enlarge the map


def test_per_channel_by_hand():
    v = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]], [[[0.0, 0.0]], [[2.0, 0.0]]]])  # (2, 2, 1, 2)
    assert values(agg.per_channel(v, "sum")) == [[4.0, 12.0], [0.0, 2.0]]
    assert values(agg.per_channel(v, "max")) == [[3.0, 7.0], [0.0, 2.0]]
    assert values(agg.per_channel(v, "percentile", q=50)) == [[2.0, 6.0], [0.0, 1.0]]
    mask = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # per channel: first pixel of c0, second of c1
    assert values(agg.per_channel(v, "masked_mean", mask=mask)) == [[1.0, 7.0], [0.0, 0.0]]


def test_aggregate_many_keys_and_params():
    table = agg.aggregate_many(TWO_IMAGES, {"sum": {}, "percentile": {"q": 50}, "patch_max": {"patch": 1}})
    assert list(table) == ["sum", "percentile", "patch_max"]
    assert values(table["percentile"]) == [2.5, 0.0]
    assert values(table["patch_max"]) == [4.0, 8.0]


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown aggregation 'median'; valid: sum, mean, max, percentile"):
        agg.aggregate(TWO_IMAGES, "median")


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("sum", {"q": 5}, "unexpected parameter.*takes no parameters"),
        ("percentile", {"p": 5}, "unexpected parameter.*p; its parameters are q"),
        ("percentile", {"q": 101}, r"`q` must be in \[0, 100\]"),
        ("percentile", {"q": float("nan")}, "finite number"),
        ("patch_max", {"patch": 0}, "`patch` must be an integer >= 1"),
        ("patch_max", {"patch": 2.5}, "`patch` must be an integer"),
        ("masked_mean", {}, "missing a required argument: 'mask'"),
    ],
)
def test_bad_parameters_are_rejected_before_computing(method, params, message):
    with pytest.raises(ValueError, match=message):
        agg.check_aggregation(method, params)
    with pytest.raises(ValueError, match=message):
        agg.aggregate(TWO_IMAGES, method, **params)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(2, 2, 2), r"shape \(B, C, H, W\)"),
        (torch.ones(0, 1, 2, 2), "must not be empty"),
        (torch.ones(1, 1, 2, 2, dtype=torch.int64), "floating-point"),
        ([[1.0]], "torch.Tensor or numpy array"),
    ],
)
def test_bad_variance_maps_are_rejected(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        agg.aggregate(bad, "sum")


# --------------------------------------------------------------------------------------------
# filtering
# --------------------------------------------------------------------------------------------
def test_mean_plus_std_by_hand():
    scores = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])  # mean 5, population std 2
    d = agg.filter_scores(scores)
    assert d.rule == "mean_plus_std" and d.threshold == pytest.approx(7.0)
    assert values(d.removed) == [7] and values(d.kept) == [0, 1, 2, 3, 4, 5, 6]  # 7 ≤ 7 stays
    half = agg.filter_scores(scores, "mean_plus_std", num_std=0.5)
    assert half.threshold == pytest.approx(6.0) and values(half.removed) == [6, 7]


def test_mean_plus_std_on_identical_scores_keeps_all():
    d = agg.filter_scores(torch.full((4,), 3.0))
    assert values(d.kept) == [0, 1, 2, 3] and values(d.removed) == []
    one = agg.filter_scores(torch.tensor([5.0]))
    assert values(one.kept) == [0]


def test_top_k_by_hand_with_ties():
    d = agg.filter_scores(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0]), "top_k", k=2)
    assert values(d.removed) == [2, 4] and values(d.kept) == [0, 1, 3] and d.threshold is None
    assert values(agg.filter_scores(torch.tensor([1.0, 1.0, 1.0]), "top_k", k=1).removed) == [0]
    assert values(agg.filter_scores(torch.tensor([1.0, 2.0]), "top_k", k=0).removed) == []
    assert values(agg.filter_scores(torch.tensor([1.0, 2.0]), "top_k", k=2).kept) == []


@pytest.mark.parametrize(
    "q, threshold, kept",
    [(0.5, 3.0, [1, 3, 4]), (0.84, 4.36, [1, 2, 3, 4]), (1.0, 5.0, [0, 1, 2, 3, 4]), (0.0, 1.0, [1])],
)
def test_quantile_by_hand(q, threshold, kept):
    # sorted 1..5: position q·4, linear between neighbours
    d = agg.filter_scores(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), "quantile", q=q)
    assert d.threshold == pytest.approx(threshold) and values(d.kept) == kept


def test_decision_partitions_the_batch_and_serialises():
    scores = torch.rand(17)
    d = agg.filter_scores(scores, "quantile", q=0.7)
    assert sorted(values(d.kept) + values(d.removed)) == list(range(17))
    assert d.keep.dtype == torch.bool and d.keep.shape == (17,)
    assert d.to_dict() == {
        "rule": "quantile",
        "params": {"q": 0.7},
        "threshold": d.threshold,
        "kept": values(d.kept),
        "removed": values(d.removed),
    }


@pytest.mark.parametrize(
    "rule, params, scores, message",
    [
        ("random", {}, [1.0], "unknown filter rule 'random'; valid: mean_plus_std, top_k, quantile"),
        ("top_k", {}, [1.0], "missing a required argument: 'k'"),
        ("top_k", {"k": -1}, [1.0], "`k` must be an integer >= 0"),
        ("top_k", {"k": 3}, [1.0, 2.0], r"`k` = 3 exceeds the number of images \(2\)"),
        ("quantile", {"q": 84}, [1.0], r"`q` must be in \[0, 1\]"),
        ("mean_plus_std", {"k": 1}, [1.0], "unexpected parameter.*k; its parameters are num_std"),
        ("mean_plus_std", {}, [1.0, float("nan"), float("inf")], r"image\(s\) \[1, 2\] have NaN or infinite"),
        ("mean_plus_std", {}, [], "non-empty 1-D"),
    ],
)
def test_filter_errors(rule, params, scores, message):
    with pytest.raises(ValueError, match=message):
        agg.filter_scores(torch.tensor(scores), rule, **params)

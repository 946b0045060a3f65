"""bayesdiff_ext.numerics: the accumulation dtype and the per-image sum every layer uses."""

import pytest
import torch

from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_float64_stays_float64_everything_else_accumulates_in_float32(dtype, expected):
    assert accumulation_dtype(dtype) == expected
    assert accumulation_dtype(torch.zeros(2, dtype=dtype)) == expected


def test_per_image_sum_sums_all_but_the_leading_dimension():
    values = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    torch.testing.assert_close(per_image_sum(values), values.sum(dim=(1, 2, 3)), rtol=0, atol=0)
    assert per_image_sum(values.float()).dtype == torch.float32
    assert per_image_sum(torch.ones(1, 7)).tolist() == [7.0]

"""Wilson intervals against a reference and their textbook properties."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rm_sweep.stats import wilson, with_intervals


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (15, 100), (500, 1000), (1, 3), (4999, 5000)])
def test_wilson_equals_scipys(k: int, n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((reference.low, reference.high), abs=1e-9)


def test_wilson_intervals_hold_the_rate_shrink_with_n_and_are_nan_without_trials() -> None:
    k, n = np.array([3, 30, 300, 0]), np.array([10, 100, 1000, 0])
    low, high = wilson(k, n)
    rate = k[:3] / n[:3]
    assert ((low[:3] <= rate) & (rate <= high[:3])).all()
    assert (np.diff(high[:3] - low[:3]) < 0).all()
    assert math.isnan(low[3]) and math.isnan(high[3])


def test_matrix_rows_get_their_interval() -> None:
    rows = pd.DataFrame({"n_defended": [15, 0], "n_evaluated": [100, 0], "defense_rate": [0.15, math.nan]})
    out = with_intervals(rows)
    assert out.loc[0, "ci_low"] == pytest.approx(0.09306, abs=1e-5) and math.isnan(out.loc[1, "ci_high"])

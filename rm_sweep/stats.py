"""Uncertainty of the store's rates: Wilson intervals of counts, mean and std over seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rm_sweep.spec import MATRIX_KEY

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson(successes: np.ndarray | pd.Series | int, trials: np.ndarray | pd.Series | int,
           z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a binomial rate, elementwise: (low, high) in [0, 1], NaN
    where ``trials`` is 0. Unlike the normal interval it stays inside [0, 1] and is not empty at
    0 or ``trials`` successes, which defense rates often reach."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def with_intervals(matrix: pd.DataFrame) -> pd.DataFrame:
    """``matrix`` rows with ``ci_low`` and ``ci_high``: the 95 % Wilson interval of each
    ``defense_rate`` (``n_defended`` of ``n_evaluated``)."""
    low, high = wilson(matrix["n_defended"], matrix["n_evaluated"])
    return matrix.assign(ci_low=low, ci_high=high)


def widest_cells(matrix: pd.DataFrame) -> pd.DataFrame:
    """``matrix`` with one cell per key but the image limit: the one with the largest limit.

    Every protocol takes the first ``limit`` images of a fixed order (the test set's, or of those
    the model classifies correctly), so a smaller limit's images are among a larger one's:
    summing both cells would count those images twice and narrow the interval. Rows keep their
    order.
    """
    others = [k for k in MATRIX_KEY if k != "limit"]
    return matrix.sort_values("limit", kind="stable").drop_duplicates(others, keep="last").sort_index()


__all__ = ["Z95", "widest_cells", "wilson", "with_intervals"]

"""Uncertainty of the store's rates: Wilson intervals of counts, mean and std over seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd

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


__all__ = ["Z95", "wilson", "with_intervals"]

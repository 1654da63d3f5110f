"""Agreement between predicted and rated attributes, one implementation shared by training (early
stopping), evaluation, the transfer sweep and the bias audit."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def pearson_columns(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair, (N, K) x (N, K) -> (K,) (1-D inputs: one column); NaN where
    either side is constant or there are fewer than two rows (no correlation is defined)."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    actual = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    if len(predicted) < 2:
        return np.full(predicted.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return np.atleast_1d(stats.pearsonr(predicted, actual, axis=0).statistic).astype(np.float64)

"""Honest numbers on small rated sets: identity-grouped folds, a grouped bootstrap of Pearson r,
and mean ± SD over folds.

Faces of one person are not independent samples: a fold or a bootstrap resample that splits them
overstates what the model does on new people, so every resample here moves whole groups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from psyface.errors import PsyfaceError


def face_groups(table: pd.DataFrame, identity_column: str | None) -> np.ndarray:
    """Who each row is: its identity where the dataset declares one, else the image itself."""
    return table[identity_column if identity_column else "id"].astype(str).to_numpy()


def grouped_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of every row; a group's rows share one fold (sklearn's GroupKFold,
    shuffled with `seed`, so folds are not ordered by identity name)."""
    n_groups = len(np.unique(groups))
    if not 2 <= k <= n_groups:
        raise PsyfaceError(f"split.folds must be between 2 and the number of groups ({n_groups}), got {k}")
    fold = np.empty(len(groups), dtype=np.int64)
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for index, (_, held_out) in enumerate(splitter.split(np.zeros(len(groups)), groups=groups)):
        fold[held_out] = index
    return fold


def grouped_bootstrap_r(predicted: np.ndarray, rated: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of each column's Pearson r and of their mean, resampling whole
    groups (identities) with replacement -> (low, high) per column, (low, high) of the mean.

    Hand-written because scipy.stats.bootstrap resamples single observations; a cluster bootstrap
    has to draw groups and take all their rows. A resample is a count per group, so each row weighs
    as often as its group was drawn and every resample's r is a weighted Pearson r: all of them in
    a few matrix products instead of a Python loop (the same r as on the concatenated rows)."""
    rng = np.random.default_rng(seed)
    labels, members = np.unique(groups, return_inverse=True)
    n_groups = len(labels)
    drawn = rng.integers(0, n_groups, (n_boot, n_groups))
    counts = np.bincount((drawn + n_groups * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n_groups)
    weights = counts.reshape(n_boot, n_groups)[:, members].astype(np.float64)
    weights /= weights.sum(axis=1, keepdims=True)
    x = np.asarray(predicted, dtype=np.float64).reshape(len(predicted), -1)
    y = np.asarray(rated, dtype=np.float64).reshape(len(rated), -1)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)  # centred first: the moments below do not cancel
    mean_x, mean_y = weights @ x, weights @ y
    var_x, var_y = weights @ (x * x) - mean_x ** 2, weights @ (y * y) - mean_y ** 2
    covariance = weights @ (x * y) - mean_x * mean_y
    # a resample that leaves a column constant has no r (NaN, as pearson_columns); rounding leaves
    # such a variance a few ulps from zero rather than at it
    floor = 1e-12 * np.maximum(x.var(axis=0), y.var(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rs = np.where((var_x > floor) & (var_y > floor), covariance / np.sqrt(var_x * var_y), np.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(rs, [tail, 100 - tail], axis=0)
    mean_low, mean_high = np.nanpercentile(np.nanmean(rs, axis=1), [tail, 100 - tail])
    return low, high, np.asarray(mean_low), np.asarray(mean_high)


def fold_summary(per_fold: list[dict[str, float]], attributes: list[str]) -> dict[str, dict[str, float]]:
    """Per attribute (and `mean`, the per-fold mean over attributes): mean and SD (ddof 1) over folds."""
    table = np.array([[fold[a] for a in attributes] for fold in per_fold], dtype=np.float64)
    columns = {**{a: table[:, i] for i, a in enumerate(attributes)}, "mean": table.mean(1)}
    return {name: {"pearson_r_mean": float(values.mean()),
                   "pearson_r_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            for name, values in columns.items()}

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
from psyface.metrics import pearson_columns


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
    has to draw groups and take all their rows."""
    rng = np.random.default_rng(seed)
    labels, members = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(members == g) for g in range(len(labels))]
    rs = np.empty((n_boot, predicted.shape[1]))
    for b in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.integers(0, len(labels), len(labels))])
        rs[b] = pearson_columns(predicted[rows], rated[rows])
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

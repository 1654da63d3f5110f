"""Bias audit: per-group ratings and predictions (Fairlearn `MetricFrame`), gaps, amplification, flags.

For each attribute and each sensitive feature (or declared intersection of features):

- `MetricFrame` per group: count, mean rating, mean prediction, MAE, Pearson r, with bootstrap CIs,
  and Fairlearn's between-group differences with their CIs;
- the binarised view (rating above the training median): selection rate, true/false positive rates,
  demographic parity and equalized odds differences — for the model and for the raters themselves;
- signed gaps of each group against the reference group (the first declared category): in ratings
  (the raters' bias), in predictions (the model's) and their difference, the bias amplification.
  Fairlearn's `difference()` is max − min, never below 0, so its CI cannot test "no gap"; the signed
  gaps get their own stratified bootstrap.

A gap is flagged when its CI excludes 0 and its size, in rating standard deviations, reaches
`FlagRule.min_abs_gap_sd`. With `familywise` the flagging CI is Bonferroni-widened over the
comparisons made for one attribute, so a bias-free attribute is unlikely to be flagged by chance
across its many groups and intersections.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from tqdm import tqdm

GROUP_SEPARATOR = " & "
GAP_KINDS = ("rating_gap", "prediction_gap", "amplification")


@dataclass(frozen=True)
class FlagRule:
    """When a gap counts as bias: CI excluding 0 and |gap| at least `min_abs_gap_sd` rating SDs."""

    ci: float = 0.95
    min_abs_gap_sd: float = 0.2
    familywise: bool = True

    def flag_ci(self, comparisons: int) -> float:
        """The CI level used for flags: Bonferroni over `comparisons` when `familywise`."""
        return 1 - (1 - self.ci) / max(comparisons, 1) if self.familywise else self.ci


@dataclass(frozen=True)
class AuditData:
    """What the audit needs, one row per audited image (all aligned on the same index)."""

    ratings: pd.DataFrame  # one column per attribute
    predictions: pd.DataFrame  # same columns, model predictions on the rating scale
    sensitive: pd.DataFrame  # one column per sensitive feature, values = categories
    categories: dict[str, list[str]]  # declared order; the first category is the reference
    medians: dict[str, float]  # training-split median per attribute, the binarisation threshold
    clusters: pd.Series | None = None  # e.g. identity: images resampled together in the bootstrap


@dataclass(frozen=True)
class AuditResult:
    groups: pd.DataFrame  # attribute, feature, group: metrics with CIs
    summary: pd.DataFrame  # attribute, feature: between-group differences, DPD/EOD, flags
    gaps: pd.DataFrame  # attribute, feature, group vs reference: signed gaps, CIs, flags


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if len(y_true) < 2 or y_true.std() == 0 or y_pred.std() == 0:
        return float("nan")
    return float(np.corrcoef(y_true, y_pred)[0, 1])


def _mean_rating(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true))


def _mean_prediction(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_pred))


def _mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))


REGRESSION_METRICS: dict[str, Callable] = {
    "count": count,
    "mean_rating": _mean_rating,
    "mean_prediction": _mean_prediction,
    "mae": _mae,
    "pearson_r": pearson_r,
}
BINARY_METRICS: dict[str, Callable] = {
    "base_rate": lambda y_true, y_pred: float(np.mean(y_true)),
    "selection_rate": selection_rate,
    "true_positive_rate": true_positive_rate,
    "false_positive_rate": false_positive_rate,
}


def group_labels(sensitive: pd.DataFrame, features: list[str]) -> pd.Series:
    """One label per row: the category, or categories joined by ' & ' for an intersection."""
    return sensitive[features].astype(str).agg(GROUP_SEPARATOR.join, axis=1)


def reference_group(categories: dict[str, list[str]], features: list[str], present: Iterable[str]) -> str:
    """The first declared category (combination) that occurs in the data: gaps are measured from it."""
    present = set(present)
    for combination in itertools.product(*(categories[feature] for feature in features)):
        label = GROUP_SEPARATOR.join(combination)
        if label in present:
            return label
    raise ValueError(f"no declared category of {features} occurs in the audited data")


def _frame_rows(frame: MetricFrame) -> pd.DataFrame:
    """by_group values with `_lo`/`_hi` CI columns (none for counts), indexed by group label."""
    table = frame.by_group
    if frame.ci_quantiles:
        low, high = (ci.drop(columns="count") for ci in (frame.by_group_ci[0], frame.by_group_ci[-1]))
        table = table.join(low.add_suffix("_lo")).join(high.add_suffix("_hi"))
    return table


def _cluster_bootstrap_means(
    values: np.ndarray, clusters: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_boot, k) means of the k columns of `values` over clusters resampled with replacement.

    Images of one identity share their traits (and ratings of hidden traits), so resampling whole
    identities keeps the CI honest; with every row its own cluster this is the plain bootstrap.
    """
    codes, inverse = np.unique(clusters, return_inverse=True)
    draws = rng.multinomial(len(codes), np.full(len(codes), 1 / len(codes)), size=n_boot)
    weights = draws[:, inverse].astype(float)  # (n_boot, n_rows): how often each row was drawn
    return (weights @ values) / weights.sum(axis=1, keepdims=True)


def bootstrap_gaps(
    ratings: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    clusters: np.ndarray,
    reference: str,
    scale: float,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> list[dict]:
    """Signed gaps (group − reference) in ratings, predictions and their difference, with percentile CIs.

    Resampling is stratified by group and clustered (`clusters`, e.g. identities), so every replicate
    keeps every group. Gaps are also given in units of `scale` (the rating standard deviation).
    """
    both = np.column_stack([ratings, predictions]).astype(float)
    tail = (1 - ci) / 2

    def group_means(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return both[mask].mean(axis=0), _cluster_bootstrap_means(both[mask], clusters[mask], n_boot, rng)

    reference_mask = labels == reference
    reference_mean, reference_boot = group_means(reference_mask)
    rows = []
    for group in sorted(set(labels) - {reference}):
        mask = labels == group
        mean, boot = group_means(mask)
        gap, gap_boot = mean - reference_mean, boot - reference_boot
        estimates = {
            "rating_gap": (gap[0], gap_boot[:, 0]),
            "prediction_gap": (gap[1], gap_boot[:, 1]),
            "amplification": (gap[1] - gap[0], gap_boot[:, 1] - gap_boot[:, 0]),
        }
        row: dict = {"group": group, "reference": reference, "n_group": int(mask.sum()),
                     "n_reference": int(reference_mask.sum()), "ci_level": ci}
        for kind, (value, replicates) in estimates.items():
            low, high = np.quantile(replicates, [tail, 1 - tail])
            row |= {kind: float(value), f"{kind}_lo": float(low), f"{kind}_hi": float(high),
                    f"{kind}_sd": float(value / scale), f"{kind}_sd_lo": float(low / scale),
                    f"{kind}_sd_hi": float(high / scale)}
        rows.append(row)
    return rows


def flag(value_sd: float, low: float, high: float, rule: FlagRule) -> bool:
    """The flag rule: CI excludes 0 and |gap| (in rating SDs) reaches the threshold."""
    return bool((low > 0 or high < 0) and abs(value_sd) >= rule.min_abs_gap_sd)


def feature_sets(sensitive_features: Iterable[str], intersections: Iterable[list[str]]) -> list[list[str]]:
    """Each sensitive feature alone, then each declared intersection."""
    return [[feature] for feature in sensitive_features] + [list(combo) for combo in intersections]


def audit(
    data: AuditData,
    features: list[list[str]],
    rule: FlagRule,
    n_boot: int,
    seed: int,
    progress: bool = True,
) -> AuditResult:
    """The whole audit: every attribute × feature set, with seeded bootstraps."""
    quantiles = [(1 - rule.ci) / 2, 1 - (1 - rule.ci) / 2]
    rng = np.random.default_rng(seed)
    labels_by_set = {GROUP_SEPARATOR.join(combo): group_labels(data.sensitive, combo) for combo in features}
    comparisons = sum(labels.nunique() - 1 for labels in labels_by_set.values())
    flag_ci = rule.flag_ci(comparisons)
    clusters = (data.clusters if data.clusters is not None else pd.Series(range(len(data.ratings)))).to_numpy()
    group_rows, summary_rows, gap_rows = [], [], []
    jobs = [(attribute, combo) for attribute in data.ratings.columns for combo in features]
    for attribute, combo in tqdm(jobs, desc="bias audit (bootstrap)", unit="table", disable=not progress):
        name = GROUP_SEPARATOR.join(combo)
        labels = labels_by_set[name]
        y_true = data.ratings[attribute].to_numpy(float)
        y_pred = data.predictions[attribute].to_numpy(float)
        regression = MetricFrame(
            metrics=REGRESSION_METRICS, y_true=y_true, y_pred=y_pred, sensitive_features=labels.rename(name),
            n_boot=n_boot, ci_quantiles=quantiles, random_state=seed,
        )
        true_bin = y_true > data.medians[attribute]
        pred_bin = y_pred > data.medians[attribute]
        binary = MetricFrame(
            metrics=BINARY_METRICS, y_true=true_bin, y_pred=pred_bin, sensitive_features=labels.rename(name)
        )
        table = _frame_rows(regression).join(_frame_rows(binary))
        table.index.name = "group"
        group_rows.append(table.reset_index().assign(attribute=attribute, feature=name))

        scale = float(np.std(y_true)) or 1.0
        reference = reference_group(data.categories, combo, labels)
        gaps = bootstrap_gaps(y_true, y_pred, labels.to_numpy(), clusters, reference, scale, n_boot, flag_ci, rng)
        for row in gaps:
            for kind in GAP_KINDS:
                row[f"{kind}_flag"] = flag(row[f"{kind}_sd"], row[f"{kind}_lo"], row[f"{kind}_hi"], rule)
        gap_rows.extend({"attribute": attribute, "feature": name} | row for row in gaps)

        summary = {"attribute": attribute, "feature": name, "n": int(len(y_true))}
        difference = regression.difference()
        low, high = regression.difference_ci()
        for metric in ("mean_rating", "mean_prediction", "mae", "pearson_r"):
            summary |= {f"{metric}_difference": float(difference[metric]),
                        f"{metric}_difference_lo": float(low[metric]), f"{metric}_difference_hi": float(high[metric])}
        summary |= {
            "median_threshold": float(data.medians[attribute]),
            "demographic_parity_difference": demographic_parity_difference(true_bin, pred_bin, sensitive_features=labels),
            "equalized_odds_difference": equalized_odds_difference(true_bin, pred_bin, sensitive_features=labels),
            "rating_demographic_parity_difference": demographic_parity_difference(
                true_bin, true_bin, sensitive_features=labels
            ),
        }
        for kind in GAP_KINDS:
            summary[f"{kind}_flag"] = any(row[f"{kind}_flag"] for row in gaps)
        summary["flagged"] = any(summary[f"{kind}_flag"] for kind in GAP_KINDS)
        summary_rows.append(summary)

    lead = ["attribute", "feature"]
    groups = pd.concat(group_rows, ignore_index=True)
    return AuditResult(
        groups=groups[lead + [c for c in groups.columns if c not in lead]],
        summary=pd.DataFrame(summary_rows),
        gaps=pd.DataFrame(gap_rows),
    )


def flagged_pairs(result: AuditResult) -> list[dict]:
    """Short list of flagged (attribute, feature, group, kind) with the gap in SDs, for people and MLflow."""
    flags = []
    for row in result.gaps.to_dict("records"):
        for kind in GAP_KINDS:
            if row[f"{kind}_flag"]:
                flags.append({"attribute": row["attribute"], "feature": row["feature"], "group": row["group"],
                              "reference": row["reference"], "kind": kind, "gap_sd": round(row[f"{kind}_sd"], 4)})
    return flags

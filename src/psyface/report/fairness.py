"""Bias audit: per-group ratings and predictions (Fairlearn `MetricFrame`), gaps, amplification, flags.

For each attribute and each sensitive feature (or declared intersection of features):

- `MetricFrame` per group: count, mean rating, mean prediction, MAE, Pearson r, and Fairlearn's
  between-group differences (max − min over groups);
- the binarised view (rating above the training median): base rate, selection rate, true/false
  positive rates, demographic parity and equalized odds differences — for the model and for the
  raters themselves;
- signed gaps of each group against the reference group (configurable per feature set; by default
  the largest group, so gaps are measured from the best-estimated mean): in ratings (the raters'
  bias), in predictions (the model's) and their difference, the bias amplification.

Groups with fewer than `FlagRule.min_group_size` audited faces (and every comparison with a reference
that small) are reported with their numbers but never flagged: a handful of faces gives intervals
too wide to mean anything, and flagging them like large groups misleads. They are also left out of
the Bonferroni count. Intersections follow the same rule.

Confidence intervals come from one bootstrap per feature set that resamples whole identities
within each group, vectorised as replicate weights (percentile intervals for the per-group table,
normal intervals from the bootstrap standard error for the flagged gaps). Fairlearn's own `n_boot` resamples single
images (images of one person are not independent) and costs ~0.1 s per replicate per table, which
the whole audit (hundreds of replicates × dozens of tables) cannot afford; its point values are
the ones reported.

A gap is flagged when its CI excludes 0 and its size, in rating standard deviations, reaches
`FlagRule.min_abs_gap_sd`. With `familywise` the flagging CI is Bonferroni-widened over every
comparison of the audit (attributes × groups against their reference), so attributes without a
gap are unlikely to be flagged by chance across the many groups and intersections.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from statistics import NormalDist

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

from psyface.errors import PsyfaceError
from psyface.metrics import pearson_columns

GROUP_SEPARATOR = " & "
GAP_KINDS = ("rating_gap", "prediction_gap", "amplification")
CI_METRICS = ("mean_rating", "mean_prediction", "mae", "pearson_r")


@dataclass(frozen=True)
class FlagRule:
    """When a gap counts as bias: CI excluding 0 and |gap| at least `min_abs_gap_sd` rating SDs."""

    ci: float = 0.95
    min_abs_gap_sd: float = 0.2
    familywise: bool = True
    min_group_size: int = 20  # smaller groups are reported, never flagged

    def flag_ci(self, comparisons: int) -> float:
        """The CI level used for flags: Bonferroni over `comparisons` when `familywise`."""
        return 1 - (1 - self.ci) / max(comparisons, 1) if self.familywise else self.ci


@dataclass(frozen=True)
class AuditData:
    """What the audit needs, one row per audited image (all aligned on the same index)."""

    ratings: pd.DataFrame  # one column per attribute
    predictions: pd.DataFrame  # same columns, model predictions on the rating scale
    sensitive: pd.DataFrame  # one column per sensitive feature, values = categories
    categories: dict[str, list[str]]  # declared order (breaks ties between equally large reference candidates)
    medians: dict[str, float]  # training-split median per attribute, the binarisation threshold
    clusters: pd.Series | None = None  # e.g. identity: images resampled together in the bootstrap


@dataclass(frozen=True)
class AuditResult:
    groups: pd.DataFrame  # attribute, feature, group: metrics with CIs
    summary: pd.DataFrame  # attribute, feature: between-group differences, DPD/EOD, flags
    gaps: pd.DataFrame  # attribute, feature, group vs reference: signed gaps, CIs, flags


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (no correlation is defined)."""
    return float(pearson_columns(y_pred, y_true)[0])


def _mean_rating(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true))


def _mean_prediction(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_pred))


def _mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))


def _base_rate(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true))


REGRESSION_METRICS: dict[str, Callable] = {
    "count": count,
    "mean_rating": _mean_rating,
    "mean_prediction": _mean_prediction,
    "mae": _mae,
    "pearson_r": pearson_r,
}
BINARY_METRICS: dict[str, Callable] = {
    "base_rate": _base_rate,
    "selection_rate": selection_rate,
    "true_positive_rate": true_positive_rate,
    "false_positive_rate": false_positive_rate,
}


def group_labels(sensitive: pd.DataFrame, features: list[str]) -> pd.Series:
    """One label per row: the category, or categories joined by ' & ' for an intersection."""
    return sensitive[features].astype(str).agg(GROUP_SEPARATOR.join, axis=1)


def reference_group(categories: dict[str, list[str]], features: list[str], labels: pd.Series,
                    configured: str | None = None) -> str:
    """The group gaps are measured from: `configured` when given (it must occur in `labels`), else
    the largest group, ties broken by the declared category order."""
    counts = labels.value_counts()
    if configured is not None:
        if configured not in counts.index:
            raise PsyfaceError(f"params.yaml report.fairness.reference.{GROUP_SEPARATOR.join(features)}: "
                               f"{configured!r} is not a group of the audited faces; groups: {sorted(counts.index)}")
        return configured
    declared = [GROUP_SEPARATOR.join(c) for c in itertools.product(*(categories[feature] for feature in features))]
    present = [label for label in declared if label in counts.index]
    if not present:
        raise PsyfaceError(f"no declared category of {features} occurs in the audited data")
    return max(present, key=lambda label: counts[label])  # max keeps the first of equals


def small_groups(labels: pd.Series, min_size: int) -> dict[str, int]:
    """Groups below `min_size` with their sizes (reported, never flagged)."""
    counts = labels.value_counts()
    return {str(group): int(n) for group, n in counts.items() if n < min_size}


def cluster_weights(labels: np.ndarray, clusters: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_rows) bootstrap weights: within each group, whole clusters drawn with replacement.

    A row's weight is how often its cluster was drawn, so weighted statistics are the replicates'
    statistics; with every row its own cluster this is the plain stratified bootstrap.
    """
    weights = np.zeros((n_boot, len(labels)))
    for group in np.unique(labels):
        rows = np.flatnonzero(labels == group)
        codes, inverse = np.unique(clusters[rows], return_inverse=True)
        draws = rng.multinomial(len(codes), np.full(len(codes), 1 / len(codes)), size=n_boot)
        weights[:, rows] = draws[:, inverse]
    return weights


def weighted_statistics(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per replicate (row of `weights`): mean rating, mean prediction, MAE and Pearson r."""
    total = weights.sum(axis=1)

    def mean(values: np.ndarray) -> np.ndarray:
        return weights @ values / total

    mean_true, mean_pred = mean(y_true), mean(y_pred)
    covariance = mean(y_true * y_pred) - mean_true * mean_pred
    spread = np.sqrt(np.clip(mean(y_true**2) - mean_true**2, 0, None) * np.clip(mean(y_pred**2) - mean_pred**2, 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.where(spread > 0, covariance / spread, np.nan)
    return {"mean_rating": mean_true, "mean_prediction": mean_pred, "mae": mean(np.abs(y_true - y_pred)),
            "pearson_r": correlation}


def interval(replicates: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval, ignoring replicates where the statistic is undefined (NaN)."""
    tail = (1 - ci) / 2
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def normal_interval(value: float, replicates: np.ndarray, ci: float) -> tuple[float, float]:
    """value ± z·(bootstrap standard error): stable at the high levels a Bonferroni correction asks
    for, where a percentile interval would rest on the few most extreme replicates."""
    z = NormalDist().inv_cdf(1 - (1 - ci) / 2)
    error = float(np.nanstd(replicates, ddof=1))
    return value - z * error, value + z * error


def signed_gaps(
    boot: dict[str, dict[str, np.ndarray]], point: pd.DataFrame, reference: str, scale: float, ci: float
) -> list[dict]:
    """Gaps (group − reference) in ratings, predictions and their difference, with normal CIs at `ci`.

    `boot[group][metric]` are replicate values, `point` the MetricFrame by-group table; gaps are
    also given in units of `scale` (the rating standard deviation).
    """
    rows = []
    for group in point.index:
        if group == reference:
            continue
        estimates = {}
        for kind, metric in (("rating_gap", "mean_rating"), ("prediction_gap", "mean_prediction")):
            estimates[kind] = (point.loc[group, metric] - point.loc[reference, metric],
                               boot[group][metric] - boot[reference][metric])
        estimates["amplification"] = (estimates["prediction_gap"][0] - estimates["rating_gap"][0],
                                      estimates["prediction_gap"][1] - estimates["rating_gap"][1])
        row: dict = {"group": group, "reference": reference, "n_group": int(point.loc[group, "count"]),
                     "n_reference": int(point.loc[reference, "count"]), "ci_level": ci}
        for kind, (value, replicates) in estimates.items():
            low, high = normal_interval(float(value), replicates, ci)
            row |= {kind: float(value), f"{kind}_lo": low, f"{kind}_hi": high, f"{kind}_sd": float(value / scale),
                    f"{kind}_sd_lo": low / scale, f"{kind}_sd_hi": high / scale}
        rows.append(row)
    return rows


def flag(value_sd: float, low: float, high: float, rule: FlagRule) -> bool:
    """The flag rule: CI excludes 0 and |gap| (in rating SDs) reaches the threshold."""
    return bool((low > 0 or high < 0) and abs(value_sd) >= rule.min_abs_gap_sd)


def feature_sets(sensitive_features: Iterable[str], intersections: Iterable[list[str]]) -> list[list[str]]:
    """Each sensitive feature alone, then each declared intersection."""
    return [[feature] for feature in sensitive_features] + [list(combo) for combo in intersections]


def audit_table(
    attribute: str, name: str, labels: pd.Series, weights: np.ndarray, data: AuditData, reference: str,
    rule: FlagRule, flag_ci: float,
) -> tuple[pd.DataFrame, dict, list[dict]]:
    """One attribute × feature set: (per-group table, summary row, gap rows)."""
    y_true = data.ratings[attribute].to_numpy(float)
    y_pred = data.predictions[attribute].to_numpy(float)
    features = labels.rename(name)
    regression = MetricFrame(metrics=REGRESSION_METRICS, y_true=y_true, y_pred=y_pred, sensitive_features=features)
    true_bin, pred_bin = y_true > data.medians[attribute], y_pred > data.medians[attribute]
    binary = MetricFrame(metrics=BINARY_METRICS, y_true=true_bin, y_pred=pred_bin, sensitive_features=features)

    point = regression.by_group
    boot = {group: weighted_statistics(weights[:, (labels == group).to_numpy()],
                                       y_true[labels == group], y_pred[labels == group]) for group in point.index}
    table = point.copy()
    for metric in CI_METRICS:
        bounds = [interval(boot[group][metric], rule.ci) for group in point.index]
        table[f"{metric}_lo"], table[f"{metric}_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    table = table.join(binary.by_group)
    table.index.name = "group"
    table["small_group"] = table["count"] < rule.min_group_size

    summary: dict = {"attribute": attribute, "feature": name, "n": int(len(y_true)), "reference": reference,
                     "small_groups": small_groups(labels, rule.min_group_size)}
    difference = regression.difference()
    for metric in CI_METRICS:
        spread = np.stack([boot[group][metric] for group in point.index])
        low, high = interval(spread.max(axis=0) - spread.min(axis=0), rule.ci)
        summary |= {f"{metric}_difference": float(difference[metric]), f"{metric}_difference_lo": low,
                    f"{metric}_difference_hi": high}
    summary |= {
        "median_threshold": float(data.medians[attribute]),
        "demographic_parity_difference": demographic_parity_difference(true_bin, pred_bin, sensitive_features=labels),
        "equalized_odds_difference": equalized_odds_difference(true_bin, pred_bin, sensitive_features=labels),
        "rating_demographic_parity_difference": demographic_parity_difference(true_bin, true_bin, sensitive_features=labels),
    }

    scale = float(np.std(y_true)) or 1.0
    gaps = signed_gaps(boot, point, reference, scale, flag_ci)
    for row in gaps:
        row["small_group"] = min(row["n_group"], row["n_reference"]) < rule.min_group_size
        for kind in GAP_KINDS:
            row[f"{kind}_flag"] = not row["small_group"] and flag(row[f"{kind}_sd"], row[f"{kind}_sd_lo"],
                                                                  row[f"{kind}_sd_hi"], rule)
    for kind in GAP_KINDS:
        summary[f"{kind}_flag"] = any(row[f"{kind}_flag"] for row in gaps)
    summary["flagged"] = any(summary[f"{kind}_flag"] for kind in GAP_KINDS)
    return table.reset_index(), summary, gaps


def flaggable(labels: pd.Series, reference: str, min_size: int) -> int:
    """Comparisons against `reference` that can be flagged (both groups at least `min_size`)."""
    counts = labels.value_counts()
    if counts[reference] < min_size:
        return 0
    return int((counts.drop(reference) >= min_size).sum())


def audit(
    data: AuditData,
    features: list[list[str]],
    rule: FlagRule,
    n_boot: int,
    seed: int,
    progress: bool = True,
    references: dict[str, str] | None = None,
) -> AuditResult:
    """The whole audit: every attribute × feature set; one seeded identity bootstrap per feature set.
    `references` names the reference group per feature set ("group", "group & gender"); the others
    use their largest group."""
    rng = np.random.default_rng(seed)
    clusters = (data.clusters if data.clusters is not None else pd.Series(range(len(data.ratings)))).to_numpy()
    combos = {GROUP_SEPARATOR.join(combo): combo for combo in features}
    unknown = sorted(set(references or {}) - set(combos))
    if unknown:
        raise PsyfaceError(f"params.yaml report.fairness.reference names {unknown}, which are not audited feature "
                           f"sets; known: {list(combos)}")
    labels = {name: group_labels(data.sensitive, combo) for name, combo in combos.items()}
    references = {name: reference_group(data.categories, combo, labels[name], (references or {}).get(name))
                  for name, combo in combos.items()}
    comparisons = len(data.ratings.columns) * sum(flaggable(labels[name], references[name], rule.min_group_size)
                                                  for name in combos)
    flag_ci = rule.flag_ci(comparisons)
    weights = {name: cluster_weights(values.to_numpy(), clusters, n_boot, rng) for name, values in labels.items()}
    group_tables, summary_rows, gap_rows = [], [], []
    jobs = [(attribute, name) for attribute in data.ratings.columns for name in labels]
    for attribute, name in tqdm(jobs, desc="report: bias audit (bootstrap)", unit="table", disable=not progress):
        table, summary, gaps = audit_table(attribute, name, labels[name], weights[name], data, references[name],
                                           rule, flag_ci)
        group_tables.append(table.assign(attribute=attribute, feature=name))
        summary_rows.append(summary)
        gap_rows.extend({"attribute": attribute, "feature": name} | row for row in gaps)
    lead = ["attribute", "feature"]
    if not group_tables:  # no sensitive feature declared: nothing to audit
        return AuditResult(groups=pd.DataFrame(columns=[*lead, "group"]), summary=pd.DataFrame(columns=[*lead, "flagged"]),
                           gaps=pd.DataFrame(columns=[*lead, "group", "reference", "small_group",
                                                      *(f"{kind}_flag" for kind in GAP_KINDS)]))
    groups = pd.concat(group_tables, ignore_index=True)
    return AuditResult(
        groups=groups[lead + [column for column in groups.columns if column not in lead]],
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

"""Mean ratings and their split-half reliability from a raw per-rating ("long") table.

One row per rating: face id, attribute, rating (optionally rater and trial type). Real sets rarely
give every face the same raters, so the split is made within each face: its ratings are shuffled
and dealt into two halves, the two half-means are correlated over faces, and the correlation is
Spearman–Brown corrected to the length of the full set of ratings (2r / (1 + r)). Many seeded random
splits give the estimate (the corrected mean correlation: correcting each split first would let a
near -1 split of a small set run off to large negative values) and its spread. The synthetic generator's own estimator
(`synth.split_half_reliability`) splits a complete faces x raters matrix by rater; it stays as it is
because the committed default data depend on its random draws.

All splits of one attribute are computed at once on a faces x ratings array padded with NaN
(chunked so memory stays bounded); the correlations are scipy's `pearsonr` along an axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from psyface.errors import PsyfaceError

MAX_CHUNK_VALUES = 4_000_000  # splits x faces x ratings handled at once (float64: 32 MB)


@dataclass(frozen=True)
class SplitHalf:
    """One attribute's split-half reliability over `splits` random splits."""

    reliability: float  # Spearman–Brown-corrected mean split-half r
    sd: float  # spread of the corrected value over the splits
    low: float  # 2.5 % and 97.5 % of the splits' corrected values
    high: float
    faces: int  # faces with at least two ratings (used)
    too_few: int  # faces with fewer than two ratings (not used)
    ratings_per_face: tuple[int, int, float]  # min, max, mean over the used faces
    splits: int  # splits with a defined correlation (a split whose half-means are constant has none)

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"reliability": round(self.reliability, 4), "sd": round(self.sd, 4),
                "interval_95": [round(self.low, 4), round(self.high, 4)], "faces": self.faces,
                "faces_too_few_ratings": self.too_few, "ratings_per_face_min": self.ratings_per_face[0],
                "ratings_per_face_max": self.ratings_per_face[1],
                "ratings_per_face_mean": round(self.ratings_per_face[2], 2), "splits": self.splits}


def spearman_brown(r: np.ndarray | float, factor: float = 2.0) -> np.ndarray | float:
    """Reliability of a test `factor` times as long as one with reliability `r`."""
    return factor * r / (1 + (factor - 1) * r)


def padded(ids: np.ndarray, ratings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(faces x max ratings array, NaN-padded; ratings per face) from parallel id/rating vectors."""
    codes, inverse = np.unique(ids, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(codes))
    order = np.argsort(inverse, kind="stable")
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    array = np.full((len(codes), counts.max(initial=0)), np.nan)
    array[inverse[order], slot] = ratings[order]
    return array, counts


def split_half(ids: np.ndarray, ratings: np.ndarray, splits: int = 200, seed: int = 0) -> SplitHalf:
    """Split-half reliability of the per-face mean rating (see the module docstring)."""
    array, counts = padded(np.asarray(ids), np.asarray(ratings, dtype=float))
    enough = counts >= 2
    array, counts = array[enough], counts[enough]
    if len(counts) < 3:
        raise PsyfaceError(f"split-half reliability needs at least 3 faces with 2 or more ratings, found {len(counts)}")
    rng = np.random.default_rng(seed)
    half = (counts // 2)[None, :, None]
    valid = ~np.isnan(array)
    values = np.where(valid, array, 0.0)
    chunk = max(1, MAX_CHUNK_VALUES // array.size)
    correlations = []
    for start in range(0, splits, chunk):
        n = min(chunk, splits - start)
        keys = np.where(valid[None], rng.random((n, *array.shape)), np.inf)
        ranks = keys.argsort(axis=2).argsort(axis=2)
        first = (ranks < half) & valid[None]
        second = ~first & valid[None]
        mean_first = (values[None] * first).sum(axis=2) / half[..., 0]
        mean_second = (values[None] * second).sum(axis=2) / (counts - counts // 2)[None]
        with warnings.catch_warnings():  # a split whose half-means are constant has no r: dropped below
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            correlations.append(stats.pearsonr(mean_first, mean_second, axis=1).statistic)
    r = np.concatenate(correlations)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        raise PsyfaceError("split-half reliability is undefined: the half-means never vary between faces")
    corrected = spearman_brown(r)
    low, high = spearman_brown(np.quantile(r, [0.025, 0.975]))  # monotonic: quantiles carry over
    return SplitHalf(float(spearman_brown(r.mean())), float(corrected.std(ddof=1)) if len(r) > 1 else 0.0,
                     float(low), float(high),
                     int(len(counts)), int((~enough).sum()), (int(counts.min()), int(counts.max()), float(counts.mean())),
                     len(r))


@dataclass(frozen=True)
class LongColumns:
    """Column names of a long table; `rater` and `trial_type` are optional."""

    id: str = "id"
    attribute: str = "attribute"
    rating: str = "rating"
    rater: str | None = None
    trial_type: str | None = None


def clean_long(table: pd.DataFrame, columns: LongColumns, keep_trial_types: list[str], where: str
               ) -> tuple[pd.DataFrame, list[str]]:
    """The long table as (id, attribute, rating as float) rows ready to average, and notes on what
    was dropped; a non-numeric rating is an error naming its lines."""
    notes = []
    if columns.trial_type:
        kinds = table[columns.trial_type].value_counts().to_dict()
        if keep_trial_types:
            table = table[table[columns.trial_type].isin(keep_trial_types)]
        notes.append(f"trial types {kinds}; kept {keep_trial_types or 'all'}")
    empty = table[columns.rating].isna()
    if empty.any():
        notes.append(f"{int(empty.sum())} empty rating cell(s) ignored")
    table = table[~empty]
    numbers = pd.to_numeric(table[columns.rating], errors="coerce")
    bad = [(int(i) + 2, v) for i, v in table[columns.rating][numbers.isna()].items()]
    if bad:
        raise PsyfaceError(f"{where}: rating column {columns.rating!r} has non-numeric value(s): "
                           + ", ".join(f"line {line} {v!r}" for line, v in bad[:10]))
    missing = table[columns.id].isna() | table[columns.attribute].isna()
    if missing.any():
        lines = [int(i) + 2 for i in table.index[missing][:10]]
        raise PsyfaceError(f"{where}: id or attribute empty on line(s) {lines}")
    clean = pd.DataFrame({"id": table[columns.id].to_numpy(), "attribute": table[columns.attribute].to_numpy(),
                          "rating": numbers.to_numpy(float)})
    if clean.empty:
        raise PsyfaceError(f"{where}: no rating left to use")
    if columns.rater:
        raters = table[columns.rater].nunique()
        repeats = int(table.duplicated([columns.id, columns.attribute, columns.rater]).sum())
        notes.append(f"{raters} raters" + (f"; {repeats} repeated rating(s) of a face by the same rater, "
                                            "kept as separate ratings" if repeats else ""))
    return clean, notes


def face_means(clean: pd.DataFrame) -> pd.DataFrame:
    """Mean rating per face (rows, in first-seen order) and attribute (columns, first-seen order)."""
    means = clean.pivot_table(index="id", columns="attribute", values="rating", aggfunc="mean", sort=False)
    means.columns.name = None
    return means


def reliabilities(clean: pd.DataFrame, splits: int, seed: int) -> dict[str, SplitHalf]:
    """Split-half reliability of every attribute of a cleaned long table."""
    found = {}
    for attribute, rows in clean.groupby("attribute", sort=False):
        try:
            found[attribute] = split_half(rows["id"].to_numpy(), rows["rating"].to_numpy(), splits, seed)
        except PsyfaceError as error:
            raise PsyfaceError(f"attribute {attribute!r}: {error}") from None
    return found


def decimals(text: str) -> int:
    """Digits after the decimal point as written ("3.25" -> 2, "4" -> 0)."""
    return len(text.split(".", 1)[1]) if "." in text else 0


def mean_disagreements(given: pd.DataFrame, id_column: str, means: pd.DataFrame) -> list[str]:
    """Cells of a mean table that differ from the recomputed means by more than their rounding
    (half a unit of the last digit written), as "id 'x' happy: table 3.40, ratings 3.55"."""
    found = []
    table = given.set_index(id_column)
    for attribute in means.columns.intersection(table.columns):
        for image_id, text in table[attribute].dropna().items():
            if image_id not in means.index or pd.isna(means.at[image_id, attribute]):
                continue
            try:
                value = float(text)
            except ValueError:
                continue  # a bad cell is validate's to report
            computed = float(means.at[image_id, attribute])
            if abs(value - computed) > 0.5 * 10.0 ** -decimals(str(text)) + 1e-9:
                found.append(f"id {image_id!r} {attribute}: table {text}, ratings {computed:.4g}")
    return found


def read_reliability_table(table: pd.DataFrame, where: str) -> dict[str, float]:
    """Published values: columns `attribute` and `reliability`, each value in (0, 1]."""
    missing = [c for c in ("attribute", "reliability") if c not in table.columns]
    if missing:
        raise PsyfaceError(f"{where}: column(s) {missing} not found; columns found: {list(table.columns)}")
    values = {}
    for line, (attribute, text) in enumerate(zip(table["attribute"], table["reliability"], strict=True), start=2):
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = float("nan")
        if not 0 < value <= 1:
            raise PsyfaceError(f"{where}: line {line}: reliability of {attribute!r} must be a number in (0, 1], got {text!r}")
        values[str(attribute)] = value
    return values

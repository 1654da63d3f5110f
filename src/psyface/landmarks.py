"""Stage `landmarks`: facial landmark coordinates, normalised for position, scale and roll.

Every shape is centred, scaled to unit RMS size and rotated (never reflected) onto a reference
shape, the generalised-Procrustes mean of the training faces; the pose is estimated on the landmarks
of `align_regions` (e.g. eyes and nose, which expressions barely move) or on all of them. What remains is expression (and
identity) shape, not where the face sat in the image. The same `normalise_shapes` is used by the
expression classifiers' served model, so a served face is normalised exactly as in training.

Rows that cannot be used (no landmarks, missing or non-numeric coordinates, a degenerate shape, a
duplicate id, no split or label) are written to `reports/landmarks/problems.csv` and counted; the
stage fails when they exceed `max_problem_fraction`.

A dataset without landmarks (most real rated-face sets) skips the stage with one line: its
declared outputs are still written (dvc requires them), saying "not available" and why, so
`dvc repro` runs to the end and `expressions` skips in turn.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from psyface.artifacts import (
    NORMALISED_LANDMARKS_FILE,
    NOT_AVAILABLE,
    NormalisedLandmarks,
    missing_landmarks,
    placeholder_npz,
    read_split,
)
from psyface.config import PositiveInt, UnitFloat, load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import read_csv_checked, write_atomic, write_csv_atomic
from psyface.shapes import (
    coordinate_columns,
    degenerate,
    normalise_shapes,
    procrustes_mean,
)

PROBLEMS_FILE = Path("reports/landmarks/problems.csv")
@dataclass(frozen=True)
class LandmarksParams:
    """params.yaml `landmarks:`; `label` names the dataset.yaml `labels` entry to carry along."""

    label: str = "expression"
    align_regions: list[str] = field(default_factory=lambda: ["eyes", "nose"])  # pose estimated on these; empty: all points
    procrustes_iterations: PositiveInt = 10
    max_problem_fraction: UnitFloat = 0.05


# ---------------------------------------------------------------------------------------------
# Reading and checking the coordinate table.


def count_points(columns: Iterable[str]) -> int:
    """Number of landmarks declared by a table's `x{k}` columns (used when dataset.yaml says 0)."""
    return sum(1 for column in columns if column.startswith("x") and column[1:].isdigit())


def read_coordinates(
    table: pd.DataFrame, id_column: str, n_points: int
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Numeric coordinates indexed by id, and (id, problem) for every row that cannot be used.

    A table missing whole coordinate columns is not a row problem but a wrong file: PsyfaceError.
    """
    columns = coordinate_columns(n_points)
    missing = [c for c in [id_column, *columns] if c not in table.columns]
    if missing:
        shown = missing[:6] + (["..."] if len(missing) > 6 else [])
        raise PsyfaceError(
            f"landmarks table lacks column(s) {shown} for {n_points} points; "
            f"columns found: {list(table.columns)[:12]}{' ...' if len(table.columns) > 12 else ''}"
        )
    ids = table[id_column].astype(str)
    raw = table[columns]
    numbers = raw.apply(pd.to_numeric, errors="coerce").astype(np.float64)
    problems: list[tuple[str, str]] = []
    duplicated = ids.duplicated(keep=False).to_numpy()
    empty = raw.isna().to_numpy()
    malformed = (numbers.isna().to_numpy() | ~np.isfinite(numbers.to_numpy())) & ~empty
    for row, image_id in enumerate(ids):
        if duplicated[row]:
            problems.append((image_id, "duplicate id in the landmarks table"))
        elif malformed[row].any():
            problems.append((image_id, f"malformed coordinate(s) {_names(columns, malformed[row])}"))
        elif empty[row].any():
            problems.append((image_id, f"missing coordinate(s) {_names(columns, empty[row])}"))
    numbers.index = pd.Index(ids, name="id")
    bad = {image_id for image_id, _ in problems}
    return numbers[~numbers.index.isin(bad)], problems


def _names(columns: list[str], flags: np.ndarray, shown: int = 4) -> str:
    names = [c for c, flag in zip(columns, flags, strict=True) if flag]
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def anchor_points(spec: DatasetSpec, regions: list[str], n_points: int) -> np.ndarray:
    """Landmark indices of the named dataset.yaml landmark regions (all points when none named)."""
    assert spec.landmarks is not None
    unknown = [r for r in regions if r not in spec.landmarks.regions]
    if unknown:
        raise PsyfaceError(
            f"params.yaml:landmarks.align_regions {unknown} not in dataset.yaml landmarks.regions "
            f"{sorted(spec.landmarks.regions)}"
        )
    if not regions:
        return np.arange(n_points)
    anchors = sorted({i for r in regions for i in spec.landmarks.regions[r]})
    if len(anchors) < 2 or max(anchors) >= n_points:
        raise PsyfaceError(f"landmarks.align_regions {regions} must name >= 2 of the {n_points} points")
    return np.array(anchors)


def build(
    spec: DatasetSpec, landmarks: pd.DataFrame, split: pd.DataFrame, params: LandmarksParams
) -> tuple[NormalisedLandmarks, pd.DataFrame]:
    """Join ratings, landmarks and split; normalise the usable faces; list every unusable row."""
    if spec.landmarks is None:
        raise PsyfaceError(f"dataset {spec.name!r} declares no landmarks (dataset.yaml `landmarks:`)")
    if params.label not in spec.labels:
        raise PsyfaceError(f"dataset.yaml `labels` has no {params.label!r}; found {sorted(spec.labels)}")
    label_names = spec.labels[params.label]
    ratings = spec.read_ratings()
    if params.label not in ratings.columns:
        raise PsyfaceError(f"{spec.ratings_path}: no column {params.label!r}; found {list(ratings.columns)}")
    n_points = spec.landmarks.n_points or count_points(landmarks.columns)
    coordinates, problems = read_coordinates(landmarks, spec.id_column, n_points)
    assigned = dict(zip(split["id"].astype(str), split["split"].astype(str), strict=True))
    rated = ratings[spec.id_column].astype(str)
    for image_id in sorted(set(coordinates.index) - set(rated)):
        problems.append((image_id, "landmarks for an id absent from the ratings table"))
    bad = {image_id for image_id, _ in problems}
    keep: list[int] = []
    for row, (image_id, label) in enumerate(zip(rated, ratings[params.label], strict=True)):
        if image_id in bad:
            continue
        if image_id not in coordinates.index:
            problems.append((image_id, "no landmarks row"))
        elif image_id not in assigned:
            problems.append((image_id, "no split assignment in artifacts/split.csv"))
        elif label not in label_names:
            problems.append((image_id, f"{params.label} {label!r} is not one of {label_names}"))
        else:
            keep.append(row)
    ids = rated.iloc[keep].to_numpy(dtype=str)
    raw = coordinates.loc[ids].to_numpy().reshape(len(ids), n_points, 2)
    splits = np.array([assigned[i] for i in ids], dtype=str)
    train = splits == "train"
    if not train.any():
        raise PsyfaceError("no usable training face with landmarks: check artifacts/split.csv")
    anchors = anchor_points(spec, params.align_regions, n_points)
    unusable = degenerate(raw, anchors)
    problems += [(image_id, "degenerate shape (its alignment landmarks coincide)") for image_id in ids[unusable]]
    ids, raw, splits = ids[~unusable], raw[~unusable], splits[~unusable]
    reference = procrustes_mean(raw[splits == "train"], anchors, params.procrustes_iterations)
    labels = ratings.set_index(rated)[params.label].loc[ids].to_numpy(dtype=str)
    result = NormalisedLandmarks(
        ids=ids,
        split=splits,
        labels=labels,
        label_names=np.array(label_names, dtype=str),
        points=normalise_shapes(raw, reference, anchors).astype(np.float32),
        reference=reference,
        anchors=anchors,
    )
    return result, pd.DataFrame(problems, columns=["id", "problem"])


# ---------------------------------------------------------------------------------------------
# Stage edge.


def read_landmarks_table(spec: DatasetSpec) -> pd.DataFrame:
    assert spec.landmarks is not None
    path = spec.root / spec.landmarks.file
    if not path.is_file():
        raise PsyfaceError(f"landmarks table {path} not found (dataset.yaml landmarks.file)")
    return read_csv_checked(path, dtype={spec.id_column: str}, keep_default_na=True)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psyface landmarks", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    params = load_section("landmarks", LandmarksParams)
    spec = load_dataset(DATA_DIR)
    reason = missing_landmarks(spec)
    if reason:
        write_csv_atomic(pd.DataFrame({"id": [""], "problem": [f"{NOT_AVAILABLE}: {reason}"]}), PROBLEMS_FILE)
        write_atomic(NORMALISED_LANDMARKS_FILE, lambda tmp: tmp.write_bytes(placeholder_npz(reason)))
        print(f"landmarks: skipped, {reason}; {NORMALISED_LANDMARKS_FILE} and {PROBLEMS_FILE} say '{NOT_AVAILABLE}'")
        return 0
    result, problems = build(spec, read_landmarks_table(spec), read_split(), params)
    total = len(result.ids) + problems["id"].nunique()
    write_csv_atomic(problems, PROBLEMS_FILE)
    print(f"landmarks: {len(problems)} problem row(s) -> {PROBLEMS_FILE}")
    if problems["id"].nunique() / total > params.max_problem_fraction:
        raise PsyfaceError(
            f"{problems['id'].nunique()} of {total} faces have landmark problems, more than "
            f"max_problem_fraction={params.max_problem_fraction}; see {PROBLEMS_FILE}"
        )
    result.save(NORMALISED_LANDMARKS_FILE)
    print(f"landmarks: {len(result.ids)} faces x {result.points.shape[1]} points normalised -> {NORMALISED_LANDMARKS_FILE}")
    return 0


if __name__ == "__main__":
    main()

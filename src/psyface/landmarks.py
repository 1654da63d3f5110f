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

from psyface.config import load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import read_csv_checked, write_atomic, write_csv_atomic
from psyface.split import SPLIT_FILE

OUT_FILE = Path("artifacts/landmarks/normalised.npz")
PROBLEMS_FILE = Path("reports/landmarks/problems.csv")
NOT_AVAILABLE = "not available"


def missing_landmarks(spec: DatasetSpec) -> str | None:
    """Why the landmark stages cannot run on this dataset (None: they can)."""
    if spec.landmarks is None:
        return f"dataset {spec.name!r} declares no landmarks (dataset.yaml `landmarks:`)"
    return None


def write_placeholder_png(path: Path, message: str) -> None:
    """A small PNG that says what is missing, standing in for a figure that cannot be drawn."""
    from PIL import Image, ImageDraw

    def draw(tmp: Path) -> None:
        image = Image.new("RGB", (640, 60), "white")
        ImageDraw.Draw(image).text((10, 20), f"{NOT_AVAILABLE}: {message}", fill="black")
        image.save(tmp, "PNG")

    write_atomic(path, draw)


@dataclass(frozen=True)
class LandmarksParams:
    """params.yaml `landmarks:`; `label` names the dataset.yaml `labels` entry to carry along."""

    label: str = "expression"
    align_regions: list[str] = field(default_factory=list)  # pose estimated on these; empty: all points
    procrustes_iterations: int = 10
    max_problem_fraction: float = 0.05


# ---------------------------------------------------------------------------------------------
# Pure core: shapes are (n_faces, n_points, 2) arrays; complex numbers make rotations one product.


def _as_complex(points: np.ndarray) -> np.ndarray:
    return points[..., 0] + 1j * points[..., 1]


def _as_points(shapes: np.ndarray) -> np.ndarray:
    return np.stack([shapes.real, shapes.imag], axis=-1)


def _centre_and_scale(shapes: np.ndarray, anchors: np.ndarray | slice) -> np.ndarray:
    """Complex shapes (n, P) -> moved and scaled so the `anchors` have centroid 0 and unit RMS size."""
    centred = shapes - shapes[..., anchors].mean(axis=-1, keepdims=True)
    size = np.sqrt((np.abs(centred[..., anchors]) ** 2).mean(axis=-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return centred / size


def normalise_shapes(points: np.ndarray, reference: np.ndarray, anchors: np.ndarray | None = None) -> np.ndarray:
    """Remove position, scale and roll: (n, P, 2) -> (n, P, 2) aligned onto `reference` (P, 2).

    The similarity transform is estimated on the `anchors` (landmark indices; default all) and
    applied to every point, so landmarks that move with expression can be left out of the pose
    estimate and then keep their own displacement instead of spreading it over the whole face. The
    rotation minimising the squared anchor distance to the reference is exp(i*arg(sum conj(z)*r)),
    the closed-form ordinary Procrustes solution; degenerate shapes come back as NaN.
    """
    index = slice(None) if anchors is None else np.asarray(anchors)
    shapes = _centre_and_scale(_as_complex(np.asarray(points, dtype=np.float64)), index)
    target = _centre_and_scale(_as_complex(np.asarray(reference, dtype=np.float64)), index)
    overlap = np.sum(np.conj(shapes[..., index]) * target[..., index], axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rotation = overlap / np.abs(overlap)
    return _as_points(shapes * rotation)


def procrustes_mean(
    points: np.ndarray, anchors: np.ndarray | None = None, iterations: int = 10, tolerance: float = 1e-10
) -> np.ndarray:
    """Generalised Procrustes mean shape (P, 2) of (n, P, 2) shapes, aligned on `anchors`.

    Starts from the mean of the centred, scaled (unrotated) shapes, so the reference keeps the
    images' upright orientation, and re-aligns every new mean onto it to stop the mean drifting.
    """
    index = slice(None) if anchors is None else np.asarray(anchors)
    start = _centre_and_scale(_as_complex(np.asarray(points, dtype=np.float64)), index).mean(axis=0)
    reference = _as_points(start)
    for _ in range(iterations):
        mean = normalise_shapes(points, reference, anchors).mean(axis=0)
        mean = normalise_shapes(mean[None], reference, anchors)[0]
        done = np.sum((mean - reference) ** 2) < tolerance
        reference = mean
        if done:
            break
    return reference


def flatten(points: np.ndarray) -> np.ndarray:
    """(n, P, 2) -> (n, 2P) features ordered x0, y0, x1, y1, ...; landmark j owns columns 2j, 2j+1."""
    return points.reshape(len(points), -1)


# ---------------------------------------------------------------------------------------------
# Reading and checking the coordinate table.


def coordinate_columns(n_points: int) -> list[str]:
    return [f"{axis}{index}" for index in range(n_points) for axis in ("x", "y")]


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


@dataclass(frozen=True)
class NormalisedLandmarks:
    """What the stage writes: one row per usable face, plus the reference shape used."""

    ids: np.ndarray  # (n,) str
    split: np.ndarray  # (n,) str: train/val/test
    labels: np.ndarray  # (n,) str: the `label` category of each face
    label_names: np.ndarray  # (k,) str, dataset.yaml order
    points: np.ndarray  # (n, P, 2) float32, normalised
    reference: np.ndarray  # (P, 2) float64
    anchors: np.ndarray  # (A,) int: landmarks the pose was estimated on

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a handle: savez would append .npz to a bare path
                np.savez_compressed(handle, **self.__dict__)

        write_atomic(path, write)

    @classmethod
    def load(cls, path: Path = OUT_FILE) -> NormalisedLandmarks:
        if not path.is_file():
            raise PsyfaceError(f"{path} not found: run the landmarks stage first (`dvc repro landmarks`)")
        with np.load(path, allow_pickle=False) as data:
            return cls(**{name: data[name] for name in data.files})


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
    degenerate = ~np.isfinite(_centre_and_scale(_as_complex(raw), anchors)).all(axis=1)
    problems += [(image_id, "degenerate shape (its alignment landmarks coincide)") for image_id in ids[degenerate]]
    ids, raw, splits = ids[~degenerate], raw[~degenerate], splits[~degenerate]
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


def read_split(path: Path = SPLIT_FILE) -> pd.DataFrame:
    if not path.is_file():
        raise PsyfaceError(f"{path} not found: run the split stage first (`dvc repro split`)")
    split = read_csv_checked(path, dtype={"id": str})
    if not {"id", "split"} <= set(split.columns):
        raise PsyfaceError(f"{path}: needs columns id, split; found {list(split.columns)}")
    return split


def read_landmarks_table(spec: DatasetSpec) -> pd.DataFrame:
    assert spec.landmarks is not None
    path = spec.root / spec.landmarks.file
    if not path.is_file():
        raise PsyfaceError(f"landmarks table {path} not found (dataset.yaml landmarks.file)")
    return read_csv_checked(path, dtype={spec.id_column: str}, keep_default_na=True)


def _placeholder_npz(reason: str) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, status=np.array(NOT_AVAILABLE), reason=np.array(reason))
    return buffer.getvalue()


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psyface landmarks", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    params = load_section("landmarks", LandmarksParams)
    spec = load_dataset(DATA_DIR)
    reason = missing_landmarks(spec)
    if reason:
        write_csv_atomic(pd.DataFrame({"id": [""], "problem": [f"{NOT_AVAILABLE}: {reason}"]}), PROBLEMS_FILE)
        write_atomic(OUT_FILE, lambda tmp: tmp.write_bytes(_placeholder_npz(reason)))
        print(f"landmarks: skipped, {reason}; {OUT_FILE} and {PROBLEMS_FILE} say '{NOT_AVAILABLE}'")
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
    result.save(OUT_FILE)
    print(f"landmarks: {len(result.ids)} faces x {result.points.shape[1]} points normalised -> {OUT_FILE}")
    return 0


if __name__ == "__main__":
    main()

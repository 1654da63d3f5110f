"""The files stages exchange (the outputs `dvc.yaml` names): their paths and the readers and writers
of their formats. A stage reads another stage's output through this module, never by importing that
stage, so each stage module depends only on core modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from psyface.dataset.layout import DatasetSpec
from psyface.errors import PsyfaceError
from psyface.io import read_csv_checked, replace_dir_atomic, write_atomic

SPLITS = ("train", "val", "test")
NOT_AVAILABLE = "not available"  # what a skipped stage's outputs say (dvc needs every declared output)
SPLIT_FILE = Path("artifacts/split.csv")
VALIDATION_SUMMARY_FILE = Path("reports/validation/summary.json")
PREPARED_DIR = Path("artifacts/prepared")
NORMALISED_LANDMARKS_FILE = Path("artifacts/landmarks/normalised.npz")
TRAIN_DIR = Path("artifacts/train")
RUN_FILE = TRAIN_DIR / "run.json"
CHECKPOINT_DIR = TRAIN_DIR / "checkpoints"
HISTORY_FILE = TRAIN_DIR / "history.csv"
TRAIN_FEATURES_DIR = TRAIN_DIR / "features"  # the probe's cached backbone features (persistent DVC output)
CV_FILE = TRAIN_DIR / "cv.json"  # per-fold test r when split.folds is set; {"folds": 0} otherwise
EVALUATE_METRICS_FILE = Path("reports/metrics.json")
EVALUATE_PLOTS_DIR = Path("reports/evaluate")
EXPLAIN_FIGURES_DIR = Path("reports/explain/figures")
EXPLAIN_METRICS_FILE = Path("reports/explain/metrics.json")
EXPLAIN_MAPS_FILE = Path("artifacts/explain/maps.npz")
EXPLAIN_GROUND_TRUTH_FILE = Path("reports/explain/ground_truth.json")  # the ground_truth stage's check of the regions


def read_split(path: Path = SPLIT_FILE) -> pd.DataFrame:
    """The id -> split table `split` writes, checked for its columns."""
    if not path.is_file():
        raise PsyfaceError(f"{path} not found: run the split stage first (`dvc repro split`)")
    split = read_csv_checked(path, dtype={"id": str})
    if not {"id", "split"} <= set(split.columns):
        raise PsyfaceError(f"{path}: needs columns id, split; found {list(split.columns)}")
    return split


@dataclass
class Prepared:
    """The arrays `prepare` writes; row i of every field is the same image."""

    images: np.ndarray
    table: pd.DataFrame
    masks: np.ndarray | None = None
    attention: np.ndarray | None = None

    def split(self, name: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.table["split"].to_numpy() == name)


def save_prepared(prepared: Prepared, folder: Path, dataset: str) -> None:
    """Write the arrays, table and meta.json of `prepared` into `folder` atomically."""
    def fill(tmp: Path) -> None:
        np.save(tmp / "images.npy", prepared.images)
        prepared.table.to_csv(tmp / "table.csv", index=False)
        if prepared.masks is not None:
            np.save(tmp / "masks.npy", prepared.masks)
        if prepared.attention is not None:
            np.save(tmp / "attention.npy", prepared.attention)
        counts = prepared.table["split"].value_counts()
        meta = {
            "dataset": dataset,
            "image_size": int(prepared.images.shape[1]),
            "n": len(prepared.table),
            "counts": {name: int(counts.get(name, 0)) for name in SPLITS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    replace_dir_atomic(folder, fill)


def load_prepared(folder: Path = PREPARED_DIR, mmap: bool = True) -> Prepared:
    """Read what `prepare` wrote (images memory-mapped: no copy until used)."""
    if not (folder / "meta.json").is_file():
        raise PsyfaceError(f"{folder} is incomplete or missing: run `dvc repro prepare`")
    mode = "r" if mmap else None
    optional = {name: folder / f"{name}.npy" for name in ("masks", "attention")}
    return Prepared(
        images=np.load(folder / "images.npy", mmap_mode=mode),
        table=pd.read_csv(folder / "table.csv", dtype={"id": str}),
        **{name: np.load(path, mmap_mode=mode) if path.exists() else None for name, path in optional.items()},
    )


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
    def load(cls, path: Path = NORMALISED_LANDMARKS_FILE) -> NormalisedLandmarks:
        if not path.is_file():
            raise PsyfaceError(f"{path} not found: run the landmarks stage first (`dvc repro landmarks`)")
        with np.load(path, allow_pickle=False) as data:
            return cls(**{name: data[name] for name in data.files})


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


def placeholder_npz(reason: str) -> bytes:
    """The normalised-landmarks file of a dataset without landmarks: a status and the reason."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, status=np.array(NOT_AVAILABLE), reason=np.array(reason))
    return buffer.getvalue()

"""A throwaway project folder for the train/evaluate/predict tests: tiny synthetic data already
split and prepared at 32 px, a params.yaml with a tiny architecture, and its own SQLite MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from psyface.artifacts import PREPARED_DIR, save_prepared
from psyface.dataset.layout import load_dataset
from psyface.prepare import prepare
from psyface.split import SplitParams, assign_splits

TINY_TRAIN = {"arch": "test_efficientnet", "last_conv_stride": 16, "epochs": 2, "batch_size": 16, "lr": 0.002, "patience": 5,
              "experiment": "tests", "seed": 1}


def make_workspace(root: Path, data: Path, registry: str = "tiny-model", **train: object) -> Path:
    """`root` becomes a project: data/ (a copy of `data`), artifacts/prepared/, params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, root / "data")
    spec = load_dataset(root / "data")
    table = spec.read_ratings()
    assignment = assign_splits(table["id"], table["identity"], SplitParams())
    save_prepared(prepare(spec, assignment, size=32), root / PREPARED_DIR, spec.name)
    params = {"train": {**TINY_TRAIN, **train}, "registry": {"name": registry}}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def tracking_env(root: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}

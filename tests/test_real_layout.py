"""A set as a lab hands it over (JPEG in a symlinked folder, a long rating table, a semicolon /
decimal-comma mean table, no masks, no landmarks): imported, then the whole `dvc repro` runs to a
report and a registered champion."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from psyface.dataset.layout import load_dataset
from psyface.dataset.real_layout import write_real_layout
from psyface.dataset.synth import SynthConfig
from psyface.tracking import use_tracking
from tests.conftest import SRC, run_cli
from tests.workspace import TINY_TRAIN

REPO = SRC.parent
MODEL = "real-layout-model"
TINY = {
    "prepare": {"image_size": 32},
    "train": {**TINY_TRAIN, "epochs": 1},
    "registry": {"name": MODEL},
    "explain": {"methods": ["gradcam", "integrated_gradients"], "max_images": {"integrated_gradients": 2},
                "options": {"ig_steps": 4, "gradcam_layer": "last"},  # TINY_TRAIN's network is no VGG
                "n_top": 2, "raw_maps_images": 2, "perturbation_images": 2,
                "perturbation_steps": 4, "sanity_images": 2},
    "report": {"manifold": {"methods": ["tsne"], "tsne_perplexity": 5, "knn_k": 3, "cv_folds": 2,
                            "score_splits": ["train", "val", "test"]},
               "fairness": {"n_boot": 20}},
}


def test_generator_writes_the_real_layout(tmp_path: Path) -> None:
    paths = write_real_layout(tmp_path / "lab", SynthConfig(n_identities=3, images_per_identity=2, size=256),
                              progress=False)
    assert paths["images"].is_symlink() and len(list(paths["images"].glob("*.jpg"))) == 6
    long = pd.read_csv(paths["ratings_long"])
    assert list(long.columns) == ["id", "rater", "attribute", "rating", "trial_type"]
    assert long.groupby(["id", "attribute"]).size().max() <= 20
    header, first = paths["ratings"].read_text(encoding="utf-8").splitlines()[:2]
    assert header.startswith("id;happy;trustworthy;") and "," in first.split(";")[1]
    assert not (tmp_path / "lab" / "masks").exists() and not list((tmp_path / "lab").rglob("landmarks*"))


@pytest.mark.slow
def test_dvc_repro_runs_end_to_end_without_masks_or_landmarks(tmp_path: Path) -> None:
    lab = write_real_layout(tmp_path / "lab", SynthConfig(n_identities=16, images_per_identity=2, size=256),
                            progress=False)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(SRC, project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", project)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for section, values in TINY.items():  # train: the tiny recipe alone (the default is VGG-only)
        params[section] = values if section == "train" else {**params.get(section, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    done = run_cli("import", "generic", "--images", str(lab["images"]), "--ratings", str(lab["ratings"]),
                   "--ratings-long", str(lab["ratings_long"]), "--rater-column", "rater", "--id-column", "id",
                   "--filename-template", "{id}.jpg", "--sensitive", "group", "gender", "--scale", "1", "7",
                   "--reliability-splits", "50", "--out", "data", cwd=project, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "32 kept as the original file, 0 re-encoded as PNG" in done.stdout
    assert "delimiter semicolon (';') detected" in done.stdout and "decimal commas read" in done.stdout
    spec = load_dataset(project / "data")
    assert not spec.has_masks and not spec.has_landmarks and set(spec.reliability) == set(spec.attributes)
    original = lab["images"] / "p0003_1.jpg"
    assert spec.image_path("p0003_1").read_bytes() == original.read_bytes()

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["init", "--no-scm", "-q"], ["repro"]):
        done = subprocess.run([*dvc, *command], cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"dvc {command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    output = done.stdout + done.stderr
    assert "landmarks: skipped, dataset 'ratings_means' declares no landmarks" in output
    assert "expressions: skipped" in output and "explain: localisation not available" in output

    landmarks = json.loads((project / "reports/landmarks/summary.json").read_text())
    assert landmarks["status"] == "not available" and "declares no landmarks" in landmarks["reason"]
    explain = json.loads((project / "reports/explain/metrics.json").read_text())["explain"]
    assert explain["localisation"].startswith("not available")
    assert "deletion" in explain["gradcam"] and "randomisation" in explain["gradcam"]  # faithfulness and sanity ran
    test = json.loads((project / "reports/metrics.json").read_text())["evaluate"]["test"]
    assert all(math.isfinite(test[name]["ceiling"]) for name in spec.attributes)  # r / ceiling on "real" data
    page = (project / "reports/index.html").read_text(encoding="utf-8")
    assert "Not computed: explanation localisation" in page and "the landmark expression branch" in page
    assert "never flagged" in page
    assert "Which explanation to trust, per attribute" in page and "the verdict of one training" in page
    assert "psyface verdicts" in page  # where to go for the verdict over seeds
    use_tracking(env["MLFLOW_TRACKING_URI"])
    champion = MlflowClient().get_model_version_by_alias(MODEL, "champion")
    run = json.loads((project / "artifacts/train/run.json").read_text())
    assert str(champion.version) == run["model_version"]

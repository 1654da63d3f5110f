"""The landmarks and expressions stages end to end on a tiny synthetic set, as DVC runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_synthetic

from psyface import landmarks
from psyface.artifacts import NORMALISED_LANDMARKS_FILE
from psyface.dataset.layout import load_dataset
from psyface.expressions import stage as expressions_stage
from psyface.split import SplitParams, assign_splits

PARAMS = """
landmarks: {max_problem_fraction: 0.05}
expressions:
  training: {hidden: 16, epochs: 60, batch_size: 1024, learning_rate: 0.02, weight_decay: 0.01}
  ig_steps: 8
  drop_per_step: 12
  min_landmarks: 8
  tolerance: 0.05
  regions: {neutral: [mouth, brows, eyes], happy: [mouth], sad: [mouth, brows],
            surprised: [mouth, brows, eyes], angry: [brows, mouth]}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """data/ from the generator, artifacts/split.csv by identity, small params."""
    spec = load_dataset(make_synthetic(tmp_path / "data", n_identities=40, images_per_identity=3, size=32))
    table = spec.read_ratings()
    split = assign_splits(table["id"], table["identity"], SplitParams())
    (tmp_path / "artifacts").mkdir()
    split.to_csv(tmp_path / "artifacts" / "split.csv", index=False)
    (tmp_path / "params.yaml").write_text(PARAMS)
    return tmp_path


@pytest.mark.slow
def test_stages_write_reports_and_register_full_and_reduced_models(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (as `psyface landmarks` / `psyface expressions` run them): one torch and MLflow import."""
    tracking = f"sqlite:///{project / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.chdir(project)
    threads = torch.get_num_threads()
    try:
        assert landmarks.main([]) == 0
        assert expressions_stage.main([]) == 0
    finally:
        torch.set_num_threads(threads)  # the stage pins one thread for its tiny models

    reports = project / "reports" / "landmarks"
    metrics = json.loads((reports / "metrics.json").read_text())["expressions"]
    assert set(metrics) == {"neutral", "happy", "sad", "surprised", "angry", "summary"}
    happy = metrics["happy"]
    assert happy["full"]["n_landmarks"] == 38 and happy["reduced"]["n_landmarks"] in (38, 26, 14, 8)
    curve = pd.read_csv(reports / "curves" / "happy.csv")
    assert curve["n_landmarks"].tolist() == [38, 26, 14, 8] and curve["chosen"].sum() == 1
    ranking = pd.read_csv(reports / "ranking.csv")
    assert len(ranking) == 5 * 38 and set(ranking["region"]) == {"jaw", "brows", "eyes", "nose", "mouth"}
    assert (reports / "kept_landmarks.png").stat().st_size > 0
    summary = json.loads((reports / "summary.json").read_text())
    assert set(summary["mlflow"]["versions"]) == {"full", "reduced"}

    import mlflow  # slow to import: only the test that loads the registered model pays for it

    mlflow.set_tracking_uri(tracking)
    served = mlflow.pyfunc.load_model("models:/psyface-landmark-expressions@reduced")
    raw = pd.read_csv(project / "data" / "landmarks.csv").drop(columns="id")
    predicted = served.predict(raw)
    assert list(predicted.columns) == [f"p_{e}" for e in metrics if e != "summary"] + ["expression"]
    truth = pd.read_csv(project / "data" / "ratings.csv")["expression"]
    assert (predicted["expression"] == truth).mean() > 0.5  # 5 classes: chance is 0.2


def test_too_many_unusable_landmark_rows_stop_the_stage_with_one_line(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table_path = project / "data" / "landmarks.csv"
    table = pd.read_csv(table_path, dtype={"id": str})
    table.loc[: len(table) // 10, "x3"] = np.nan
    table.to_csv(table_path, index=False)
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as stopped:
        landmarks.main([])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "have landmark problems, more than max_problem_fraction=0.05" in error
    assert len(error.strip().splitlines()) == 1
    problems = pd.read_csv(project / "reports" / "landmarks" / "problems.csv")
    assert problems["problem"].str.startswith("missing coordinate(s) x3").sum() == len(table) // 10 + 1
    assert not (project / NORMALISED_LANDMARKS_FILE).exists()


def test_an_expression_without_ground_truth_regions_is_a_params_error(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "params.yaml").write_text(PARAMS.replace(", angry: [brows, mouth]", ""))
    monkeypatch.chdir(project)
    assert landmarks.main([]) == 0
    with pytest.raises(SystemExit) as stopped:
        expressions_stage.main([])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("expressions.regions lacks expression(s) ['angry']")


def test_a_dataset_without_landmarks_skips_both_stages_with_placeholder_outputs(tiny_dataset, workdir: Path,
                                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """dvc needs every declared output: each one exists and says the stage could not run and why."""
    assert landmarks.main([]) == 0
    assert expressions_stage.main(["--no-tracking"]) == 0
    printed = capsys.readouterr().out
    assert "landmarks: skipped, dataset 'tiny' declares no landmarks" in printed
    assert "expressions: skipped, dataset 'tiny' declares no landmarks" in printed
    with np.load(workdir / NORMALISED_LANDMARKS_FILE) as placeholder:
        assert str(placeholder["status"]) == "not available" and "declares no landmarks" in str(placeholder["reason"])
    assert pd.read_csv(workdir / landmarks.PROBLEMS_FILE)["problem"].iloc[0].startswith("not available: dataset")
    reports = workdir / "reports" / "landmarks"
    assert json.loads((reports / "metrics.json").read_text())["expressions"]["status"] == "not available"
    assert json.loads((reports / "summary.json").read_text())["status"] == "not available"
    assert pd.read_csv(reports / "ranking.csv")["status"].tolist() == ["not available"]
    assert list(pd.read_csv(reports / "curves" / "not_available.csv").columns) == ["n_landmarks", "test_accuracy"]
    for figure in ("accuracy_vs_landmarks.png", "kept_landmarks.png"):
        assert (reports / figure).read_bytes().startswith(b"\x89PNG")

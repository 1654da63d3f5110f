"""train -> evaluate -> predict -> serve in fresh processes, as a user runs them, plus the promotion rule."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from psyface.images import load_image
from psyface.model import predict_ratings
from psyface.tracking import load_model, use_tracking
from tests.conftest import SRC, run_cli
from tests.workspace import make_workspace, tracking_env

MODEL = "tiny-model"
# One worker runs this module's tests so the trained project is built once (`pytest -n 2 --dist loadgroup`).
pytestmark = [pytest.mark.xdist_group("pipeline"), pytest.mark.slow]  # trains networks in subprocesses


def stage(module: str, root, env) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", module], cwd=root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(SRC), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory, synthetic_data):
    """A workspace after `train` and `evaluate` ran once in fresh processes."""
    root = make_workspace(tmp_path_factory.mktemp("pipeline") / "project", synthetic_data, registry=MODEL)
    env = tracking_env(root)
    stage("psyface.train", root, env)
    stage("psyface.evaluate", root, env)
    return root, env


@pytest.fixture(autouse=True)
def same_store(project):
    """In-process MLflow calls read this module's store (other tests point MLflow elsewhere)."""
    use_tracking(project[1]["MLFLOW_TRACKING_URI"])


def test_training_run_records_lineage_curves_and_model(project):
    root, _ = project
    run_file = json.loads((root / "artifacts/train/run.json").read_text())
    assert set(run_file) == {"tracking_uri", "experiment_id", "run_id", "model_name", "model_version", "model_uri"}
    client = MlflowClient()
    run = client.get_run(run_file["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.arch"] == "test_efficientnet" and run.data.params["registry.name"] == MODEL
    assert {"git.commit", "git.dirty", "data_hash", "split_hash", "dataset"} <= set(run.data.tags)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["psyface-synthetic"]
    assert len(client.get_metric_history(run.info.run_id, "val_r_happy")) == 2
    assert "test_mean_pearson_r" in run.data.metrics and "test_happy_r_over_ceiling" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/learning_curves.png", "plots/test_scatter.png"}
    version = client.get_model_version(MODEL, run_file["model_version"])
    assert set(version.aliases) == {"candidate", "champion"}
    assert version.tags["promotion.decision"] == "champion" and "first champion" in version.tags["promotion.reason"]


def test_metrics_file_has_stable_nested_keys(project):
    root, _ = project
    metrics = json.loads((root / "reports/metrics.json").read_text())["evaluate"]["test"]
    attributes = ["happy", "trustworthy", "dominant", "attractive", "age", "warm", "control"]
    assert list(metrics) == [*attributes, "mean"]
    for values in metrics.values():
        assert list(values) == ["pearson_r", "spearman_rho", "r2", "mae", "ceiling", "r_over_ceiling",
                                "pearson_r_ci_low", "pearson_r_ci_high"]
        assert values["pearson_r_ci_low"] <= values["pearson_r"] <= values["pearson_r_ci_high"]
    assert metrics["happy"]["r_over_ceiling"] == pytest.approx(metrics["happy"]["pearson_r"] / metrics["happy"]["ceiling"])
    assert set(pd.read_csv(root / "reports/evaluate/per_attribute.csv")["attribute"]) == set(attributes)


def test_predict_from_a_fresh_process_by_alias(project, tmp_path):
    root, env = project
    faces = root / "data/images"
    result = run_cli("predict", "--model", f"models:/{MODEL}@champion", str(faces), "--out", str(tmp_path / "p.csv"),
                     cwd=root, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "p.csv")
    files = sorted(faces.glob("*.png"))
    assert len(table) == len(files) and list(table.columns)[0] == "file"
    net, spec = load_model(f"models:/{MODEL}@champion", env["MLFLOW_TRACKING_URI"])
    expected = predict_ratings(net, spec, np.stack([load_image(f, spec.image_size) for f in files[:3]]))
    assert np.allclose(table[spec.attributes].to_numpy()[:3], expected, atol=1e-3)


def test_predict_refuses_unexpected_uri_schemes(project, tmp_path):
    root, env = project
    result = run_cli("predict", "--model", "runs:/abc/model", str(root / "data/images"), cwd=tmp_path, env=env)
    assert result.returncode == 2 and "refusing model URI" in result.stderr and "Traceback" not in result.stderr


def test_served_model_answers_image_bytes_on_loopback(project):
    root, env = project
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        # the server runs `uvicorn` from PATH: the environment's bin folder, as in an activated venv
        env={**os.environ, "PYTHONPATH": str(SRC), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **env})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not come up: {server.stderr.read().decode()[-2000:] if server.poll() is not None else ''}")
                time.sleep(1)
        face = sorted((root / "data/images").glob("*.png"))[0]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(face.read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        body["dataframe_split"]["data"].append([base64.b64encode(b"not an image").decode()])
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400
        message = json.loads(refused.value.read())["message"]
        assert "1 of 2 row(s) could not be used: row 1: [undecodable]" in message and "Traceback" not in message
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    net, spec = load_model(f"models:/{MODEL}@champion", env["MLFLOW_TRACKING_URI"])
    expected = predict_ratings(net, spec, load_image(face, spec.image_size)[None])[0]
    assert len(answer) == 1 and np.allclose([answer[0][a] for a in spec.attributes], expected, atol=1e-4)


def test_a_worse_or_failed_run_never_moves_champion_and_a_better_one_does(project):
    root, env = project
    client = MlflowClient()
    first = client.get_model_version_by_alias(MODEL, "champion")
    client.set_model_version_tag(MODEL, first.version, "test_mean_pearson_r", "0.999")  # an unbeatable champion
    stage("psyface.train", root, {**env})  # retrains (finished checkpoint) -> a new version
    second = json.loads((root / "artifacts/train/run.json").read_text())
    assert second["model_version"] != str(first.version)
    stage("psyface.evaluate", root, env)
    tags = client.get_model_version(MODEL, second["model_version"]).tags
    assert tags["promotion.decision"] == "rejected" and "does not beat" in tags["promotion.reason"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(first.version)

    client.set_model_version_tag(MODEL, first.version, "test_mean_pearson_r", "-1")  # now the new one is better
    client.set_terminated(second["run_id"], "FAILED")
    stage("psyface.evaluate", root, env)
    assert client.get_model_version(MODEL, second["model_version"]).tags["promotion.reason"].startswith("candidate failed")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(first.version)

    client.set_terminated(second["run_id"], "FINISHED")
    stage("psyface.evaluate", root, env)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == second["model_version"]

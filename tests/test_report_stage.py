"""The report stage end to end, checked as a person would: the page in headless Chromium, the run
and the champion model in `mlflow ui`.

One tiny project (synthetic faces, split, prepare, a one-epoch 32-px model) is built once for the
tests that need it, which run on one xdist worker (group `report`); the stages other than `report` that
are not run here (validate, evaluate, explain) are stood in for by small files of their shape.
Screenshots go to test-artifacts/ (ignored by git).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_synthetic

import psyface
from psyface.report.html import SECTIONS
from tests.browser import ARTIFACTS, chromium, headless

SRC = Path(psyface.__file__).resolve().parents[1]
MODEL_NAME = "psyface-report-test"
PARAMS = {
    "split": {"seed": 1, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "prepare": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 16},
    "registry": {"name": MODEL_NAME},
    "report": {
        # t-SNE is covered by test_report_manifold; UMAP (30 s of numba compilation) only here.
        "manifold": {"methods": ["umap"], "umap_n_neighbors": 10, "knn_k": 3, "cv_folds": 3,
                     "score_splits": ["train", "val", "test"]},
        "fairness": {"splits": ["train", "val", "test"], "n_boot": 50},
    },
}
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const out = document.createElement('pre');
  out.id = 'psyface-probe';
  out.textContent = JSON.stringify({
    images: images.length,
    broken: images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.alt),
    sections: [...document.querySelectorAll('section')].map(section => section.id + '|' + section.querySelector('h2').textContent),
  });
  document.body.appendChild(out);
});
</script>"""


def run_module(module: str, cwd: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    environment["PYTHONPATH"] = str(SRC)  # the project's own store, whatever the caller's shell says
    done = subprocess.run([sys.executable, "-m", module], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def stand_in_outputs(project: Path) -> None:
    """Files of the shape validate, evaluate and explain write, so only `report` is under test here."""
    from psyface.report import plots

    ratings = pd.read_csv(project / "data" / "ratings.csv", dtype={"id": str})
    (project / "artifacts" / "validate").mkdir(parents=True)
    ratings[["id"]].to_csv(project / "artifacts" / "validate" / "clean.csv", index=False)
    reports = project / "reports"
    (reports / "validation").mkdir(parents=True)
    (reports / "validation" / "summary.json").write_text(json.dumps({"rows": len(ratings), "passed": True}))
    (reports / "explain" / "figures").mkdir(parents=True)
    (reports / "explain" / "metrics.json").write_text(json.dumps({"gradcam": {"happy": {"localisation": 0.5}}}))
    grid = plots.accuracy_against_ceiling(pd.DataFrame({"attribute": ["happy"], "pearson_r": [0.3], "ceiling": [0.9]}))
    (reports / "explain" / "figures" / "gradcam_grid.png").write_bytes(grid)
    attributes = [c for c in ratings.columns if c not in ("id", "identity", "group", "gender", "age_band", "expression")]
    metrics = {"evaluate": {"test": {name: {"pearson_r": 0.25, "ceiling": 0.9, "r_over_ceiling": 0.25 / 0.9}
                                     for name in attributes}}}
    (reports / "metrics.json").write_text(json.dumps(metrics))


def promote_to_champion(project: Path) -> dict:
    """What evaluate does when the candidate wins: alias the registered version `champion`."""
    run = json.loads((project / "artifacts" / "train" / "run.json").read_text())
    code = ("import mlflow, sys; c = mlflow.MlflowClient(sys.argv[1], sys.argv[1]); "
            "c.set_registered_model_alias(sys.argv[2], 'champion', sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, run["tracking_uri"], run["model_name"], run["model_version"]],
                   cwd=project, check=True, timeout=120)
    return run


def build_project(project: Path) -> None:
    project.mkdir(parents=True)
    make_synthetic(project / "data", n_identities=40, images_per_identity=2)
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    stand_in_outputs(project)
    for module in ("psyface.split", "psyface.prepare", "psyface.train"):
        run_module(module, project)
    promote_to_champion(project)
    run_module("psyface.report", project)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project after `report` ran, built once: its users share the xdist group `report`, so
    one worker builds it and runs them while the other goes on with other tests."""
    folder = tmp_path_factory.mktemp("report") / "project"
    build_project(folder)
    return folder


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_report_outputs_tables_and_metrics(project: Path) -> None:
    fairness = project / "reports" / "fairness"
    gaps = pd.read_csv(fairness / "gaps.csv")
    assert {"rating_gap_sd", "prediction_gap_sd", "amplification_sd", "rating_gap_flag"} <= set(gaps.columns)
    groups = pd.read_csv(fairness / "groups.csv")
    assert {"count", "mean_rating", "mean_prediction", "mae", "pearson_r", "selection_rate"} <= set(groups.columns)
    assert set(groups["feature"]) == {"group", "gender", "age_band", "group & gender"}
    audit = json.loads((fairness / "audit.json").read_text())
    assert audit["rule"]["min_abs_gap_sd"] == 0.2 and audit["n_boot"] == 50
    coordinates = pd.read_csv(project / "reports" / "manifold" / "coordinates.csv")
    assert len(coordinates) == 80
    assert {"penultimate_umap_x", "penultimate_umap_y", "predictions_umap_x", "predictions_umap_y"} <= set(coordinates)
    metrics = json.loads((project / "reports" / "report_metrics.json").read_text())["report"]
    assert 0 <= metrics["manifold"]["penultimate_umap"]["trustworthiness"] <= 1
    assert "knn_r2_2d" in metrics["manifold"]["predictions_umap"]["control"]


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_report_opens_in_chromium_with_every_image_and_section(project: Path, chromium: Path, tmp_path: Path) -> None:
    page = (project / "reports" / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = headless(chromium, "--dump-dom", probed.as_uri(), tmp_path=tmp_path)
    start = dom.index('<pre id="psyface-probe">') + len('<pre id="psyface-probe">')
    probe = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    assert probe["broken"] == []
    assert probe["images"] == 5  # learning curves, accuracy, explanation grid, 2 embeddings
    assert probe["sections"] == [f"{anchor}|{heading}" for anchor, heading in SECTIONS]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-index.png"
    headless(chromium, "--window-size=1280,6000", f"--screenshot={shot}", (project / "reports" / "index.html").as_uri(),
             tmp_path=tmp_path)
    assert shot.stat().st_size > 10_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_mlflow_ui_shows_the_run_metrics_and_the_champion(project: Path, chromium: Path, tmp_path: Path) -> None:
    run = json.loads((project / "artifacts" / "train" / "run.json").read_text())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", run["tracking_uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=project, env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(base, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 90 s"
                time.sleep(1)
        metrics = get_json(f"{base}/ajax-api/2.0/mlflow/runs/get?run_id={run['run_id']}")["run"]["data"]["metrics"]
        names = {metric["key"] for metric in metrics}
        assert "report.fairness.flags" in names
        assert "report.manifold.penultimate_umap.trustworthiness" in names
        model = get_json(f"{base}/ajax-api/2.0/mlflow/registered-models/get?name={MODEL_NAME}")["registered_model"]
        assert {"alias": "champion", "version": run["model_version"]} in model["aliases"]

        # As a person would see them: the run page lists the report's metrics next to training's,
        # the model page shows the champion alias.
        run_url = f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
        model_url = f"{base}/#/models/{MODEL_NAME}"
        ARTIFACTS.mkdir(exist_ok=True)
        for name, url, expected in (("run", run_url, ["report.fairness.flags", "val_loss"]),
                                    ("model", model_url, ["champion", "candidate"])):
            dom = headless(chromium, "--virtual-time-budget=10000", "--dump-dom", url, tmp_path=tmp_path)
            for text in expected:
                assert text in dom, f"{text!r} not shown on the MLflow {name} page"
            headless(chromium, "--virtual-time-budget=10000", "--window-size=1280,1400",
                     f"--screenshot={ARTIFACTS / f'mlflow-{name}.png'}", url, tmp_path=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_report_says_what_it_could_not_compute(tiny_dataset) -> None:
    from psyface.explain.stage import NO_LOCALISATION
    from psyface.report.stage import not_computed

    items = not_computed(tiny_dataset, ["happy", "trustworthy"], {"explain": {"localisation": NO_LOCALISATION}})
    assert items[0].startswith("reliability ceiling and r / ceiling for happy, trustworthy")
    assert items[1].startswith("explanation localisation, not available: no region masks")
    assert items[2].startswith("the landmark expression branch") and len(items) == 3
    known = dataclasses.replace(tiny_dataset, reliability={"happy": 0.8, "trustworthy": 0.7}, sensitive_features={})
    assert not_computed(known, ["happy", "trustworthy"], {"explain": {}}) == [
        items[2], "the bias audit (dataset.yaml declares no sensitive features)"]


def test_the_explanation_verdict_is_one_readable_row_per_attribute() -> None:
    from psyface.explain.stage import ExplainParams, attribute_verdict
    from psyface.report.html import ReportContent, render
    from psyface.report.stage import explanation_verdict

    localised = {"relevance_mass_accuracy": 0.62, "relevance_mass_accuracy_ci_low": 0.55,
                 "relevance_mass_accuracy_ci_high": 0.7, "chance": 0.09, "covering_score": 0.84, "images": 300}
    by_method = {"gradcam": {"localisation": {"happy": localised}, "randomisation": {"passed": True, "rank_correlation": 0.0}},
                 "occlusion": {"localisation": {"happy": {**localised, "relevance_mass_accuracy_ci_low": 0.05}},
                               "randomisation": {"passed": False, "rank_correlation": 0.36}}}
    verdict = {"happy": attribute_verdict("happy", by_method, 0.95, True, "not checked", ExplainParams(), 0.71),
               "control": attribute_verdict("control", by_method, -0.04, False, "not checked", ExplainParams())}
    table = explanation_verdict({"explain": {"verdict": verdict}})
    rows = table.frame.set_index("attribute")
    assert rows.loc["happy", "trusted method"] == "gradcam"
    assert rows.loc["happy", "RMA [CI] (best method)"] == "0.62 [0.55, 0.70] (gradcam)"
    assert rows.loc["happy", "the mask on its grid"] == "0.84" and rows.loc["control", "the mask on its grid"] == "–"
    assert rows.loc["happy", "the model's region share"] == "0.71" and rows.loc["control", "the model's region share"] == "–"
    assert rows.loc["happy", "why others fail"].startswith("occlusion: fails randomisation (rank correlation 0.36")
    assert "not above chance" in rows.loc["happy", "why others fail"]
    assert rows.loc["control", "trusted method"] == "none" and "its maps explain noise" in rows.loc["control", "verdict"]
    assert [flagged for flagged, _ in table.rows] == [False, True]  # untrusted rows are highlighted
    assert explanation_verdict({"gradcam": {}}) is None  # an explain output without a verdict: no table
    page = render(ReportContent(title="t", generated_at="now", tables={"explanations": [table]}))
    assert "Which explanation to trust, per attribute" in page and "0.62 [0.55, 0.70] (gradcam)" in page

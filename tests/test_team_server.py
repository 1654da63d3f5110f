"""Team mode against real components: PostgreSQL + `mlflow server --app-name basic-auth` on loopback,
started by `psyface server`, a local-path DVC remote, and workspaces that share nothing but those.

One server for the whole module (it costs ~30 s to start); the kill -9 test restarts it and runs last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import SRC
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from psyface import server as server_module
from psyface.errors import server_refusal
from psyface.promotion import SCORE_TAG
from psyface.run_safety import STALE_TAG
from psyface.tracking import LOCK_SUFFIX
from tests.browser import ARTIFACTS, DevTools, chromium
from tests.workspace import make_workspace, tracking_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("team_server")]

ADMIN_PASSWORD = "admin-password-for-tests"
READER = ("student", "student-password-1")
EDITOR = ("assistant", "assistant-password-1")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.org", "DVC_NO_ANALYTICS": "1"}
# a dead server must fail a client in seconds, not after MLflow's default ~4 min of retries
FAST_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class Team:
    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url

    def env(self, user: tuple[str, str] | None) -> dict[str, str]:
        """A client's whole configuration: the URL and (maybe) a user; no local store anywhere."""
        env = {"MLFLOW_TRACKING_URI": self.url, **FAST_FAILURE}
        if user:
            env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
        return env

    def client(self, user: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
        for key, value in self.env(user).items():
            monkeypatch.setenv(key, value)
        return MlflowClient(self.url, self.url)


def without_credentials() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")}


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 900):
    """`psyface ARGS` with the given client environment and nobody else's credentials."""
    environment = {**without_credentials(), "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "psyface.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """A refusal is exit 2 with one `psyface: error:` line at the end and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("psyface: error: "), result.stderr[-3000:]
    for word in words:
        assert word in last, last
    return last


def free_port() -> int:
    return server_module.free_port()


def spawn(command: str, root: Path, env: dict[str, str]) -> subprocess.Popen:
    """`psyface COMMAND` in the background, output to files (a full pipe would stall it)."""
    environment = {**without_credentials(), "PYTHONPATH": str(SRC), **env}
    with open(root / f"{command}.out", "w") as out, open(root / f"{command}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "psyface.cli", command], cwd=root, env=environment,
                                stdout=out, stderr=err)


def finished(process: subprocess.Popen, root: Path, command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    process.wait(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, (root / f"{command}.out").read_text(),
                                       (root / f"{command}.err").read_text())


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    # pytest's own temp folders are 0700 and PostgreSQL's account (when tests run as root) must pass through
    base = Path(tempfile.mkdtemp(prefix="psyface-team-"))
    base.chmod(0o711)
    folder = base / "server"
    password_file = tmp_path_factory.mktemp("team") / "admin-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    password_file.chmod(0o600)
    ok(cli("server", "init", str(folder)))
    port = free_port()
    started = ok(cli("server", "start", str(folder), "--port", str(port), "--workers", "2",
                     "--admin-password-file", str(password_file), "--timeout", "400"))
    url = f"http://127.0.0.1:{port}"
    assert url in started.stdout
    admin = {server_module.ADMIN_ENV: ADMIN_PASSWORD}
    for (name, password), role in ((READER, "read"), (EDITOR, "edit")):
        ok(cli("server", "user", "add", name, "--role", role, "--dir", str(folder),
               env={**admin, server_module.USER_PASSWORD_ENV: password}))
    yield Team(folder, url)
    cli("server", "stop", str(folder), timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def test_server_commands_say_what_runs_and_refuse_mistakes(team, tmp_path):
    status = ok(cli("server", "status", str(team.folder)))
    assert "postgresql: running on 127.0.0.1:" in status.stdout and "running (pid" in status.stdout
    assert "healthy" in status.stdout
    again = ok(cli("server", "start", str(team.folder), "--port", "1"))
    assert f"already running at {team.url}" in again.stdout
    one_error_line(cli("server", "init", str(team.folder)), "already a psyface server folder")
    loose = tmp_path / "pw"
    loose.write_text(ADMIN_PASSWORD)
    loose.chmod(0o644)
    one_error_line(cli("server", "user", "add", "x", "--role", "read", "--dir", str(team.folder),
                       "--admin-password-file", str(loose)), "readable by others", "chmod 600")
    one_error_line(cli("server", "user", "add", "x", "--role", "read", "--dir", str(team.folder),
                       env={server_module.ADMIN_ENV: "short"}), "at least 12 characters")
    # PostgreSQL listens on loopback TCP only, with password authentication
    config = (team.folder / "postgres" / "data" / "pg_hba.conf").read_text()
    assert "scram-sha-256" in config and "trust" not in [line.split()[-1] for line in config.splitlines()
                                                          if line.strip() and not line.startswith("#")]
    assert json.loads((team.folder / "config.json").read_text())["default_permission"] == "NO_PERMISSIONS"
    assert oct((team.folder / "secrets.json").stat().st_mode & 0o777) == "0o600"


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **GIT_IDENTITY})


def dvc(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **GIT_IDENTITY})
    assert result.returncode == 0, result.stderr[-2000:]


def test_collaborator_pulls_the_champion_from_another_folder(team, tmp_path, synthetic_data, monkeypatch):
    """A trains and promotes; B (a clone elsewhere, with only the URL, a read-only user and the DVC
    remote) pulls the data and rates and explains the same images bit-identically."""
    remote, origin = tmp_path / "dvc-remote", tmp_path / "origin.git"
    a = make_workspace(tmp_path / "a", synthetic_data, registry="team-model", experiment="team")
    git("init", "-q", "-b", "main", cwd=a)
    dvc("init", cwd=a)
    dvc("add", "data", cwd=a)
    dvc("remote", "add", "-d", "shared", str(remote), cwd=a)
    (a / ".gitignore").write_text((a / ".gitignore").read_text() + "/artifacts\n/reports\n/predictions*\n/maps\n")
    git("add", "params.yaml", "data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore", cwd=a)
    git("commit", "-q", "-m", "tiny project", cwd=a)
    dvc("push", cwd=a)
    git("init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path)
    git("push", "-q", str(origin), "main", cwd=a)

    editor = team.env(EDITOR)
    ok(cli("train", cwd=a, env=editor))
    evaluated = ok(cli("evaluate", cwd=a, env=editor))
    assert "-> champion" in evaluated.stdout
    assert not (a / "mlruns").exists(), "a server is set: nothing may write a local store"
    ok(cli("predict", "data/images", "--model", "models:/team-model@champion", "--out", "predictions.csv",
           cwd=a, env=editor))
    image = sorted((a / "data" / "images").iterdir())[0].name
    ok(cli("explain", f"data/images/{image}", "--model", "models:/team-model@champion", "--out", "maps",
           cwd=a, env=editor))

    b = tmp_path / "b"
    git("clone", "-q", str(origin), str(b), cwd=tmp_path)
    assert not (b / "data").exists()
    dvc("pull", cwd=b)
    reader = team.env(READER)
    ok(cli("predict", "data/images", "--model", "models:/team-model@champion", "--out", "predictions.csv",
           cwd=b, env=reader))
    assert (b / "predictions.csv").read_text() == (a / "predictions.csv").read_text()
    ok(cli("explain", f"data/images/{image}", "--model", "models:/team-model@champion", "--out", "maps",
           cwd=b, env=reader))
    maps = sorted(p.name for p in (a / "maps").glob("*.npy"))
    assert maps and maps == sorted(p.name for p in (b / "maps").glob("*.npy"))
    for name in maps:
        assert np.array_equal(np.load(a / "maps" / name), np.load(b / "maps" / name))
    assert not (b / "mlruns").exists()

    # unauthenticated: 401 on the API, one clear line from psyface
    assert requests.get(f"{team.url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=60).status_code == 401
    one_error_line(cli("predict", "data/images", "--model", "models:/team-model@champion", cwd=b,
                       env=team.env(None)), "401", "MLFLOW_TRACKING_USERNAME")
    # read-only: may not create a run, register a version or move an alias (403) ...
    client = team.client(READER, monkeypatch)
    champion = client.get_model_version_by_alias("team-model", "champion")
    experiment = client.get_experiment_by_name("team")
    for attempt in (lambda: client.create_run(experiment.experiment_id),
                    lambda: client.create_model_version("team-model", champion.source, champion.run_id),
                    lambda: client.set_registered_model_alias("team-model", "champion", champion.version)):
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.get_http_status_code() == 403
        line = server_refusal(refused.value)  # what every psyface command prints for it
        assert line and "\n" not in line and "403" in line and repr(READER[0]) in line
    # ... and a psyface command says so in one line (training refused before its first epoch)
    one_error_line(cli("train", cwd=a, env=reader), "403", repr(READER[0]), "/runs/create")
    assert client.get_model_version_by_alias("team-model", "champion").version == champion.version


def together(command: str, roots: list[Path], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """`psyface COMMAND` in every root at the same time."""
    processes = [spawn(command, root, env) for root in roots]
    return [finished(process, root, command) for process, root in zip(processes, roots, strict=True)]


@pytest.fixture(scope="module")
def race(team, tmp_path_factory: pytest.TempPathFactory, synthetic_data):
    """Two workspaces (own folders, seeds and epoch counts) trained at the same time against the server:
    their folders and the two `psyface train` results."""
    base = tmp_path_factory.mktemp("race")
    roots = [make_workspace(base / f"w{seed}", synthetic_data, registry="race-model", experiment="race",
                            seed=seed, epochs=1 + seed) for seed in (1, 2)]
    return roots, together("train", roots, team.env(EDITOR))


def test_server_ui_compares_the_runs_of_both_workspaces(team, race, chromium, tmp_path, monkeypatch):
    """A read-only user signs in to the server's UI in a real browser and opens the compare view of the
    two workspaces' runs: both runs' ids and names, each workspace's own params.yaml values and each
    run's val_loss as the server stores it, side by side. (The page's "Runs were not found" for one
    of the two, seen now and then, was that run in the Default experiment: the two trainings create
    the experiment at once, and MLflow's `set_experiment` left the loser on experiment 0;
    `tracking.ensure_experiment` fixes it, test_experiment_race.py proves it.)"""
    roots, trainings = race
    for result in trainings:
        ok(result)
    ids = [json.loads((root / "artifacts" / "train" / "run.json").read_text())["run_id"] for root in roots]
    runs = [team.client(READER, monkeypatch).get_run(run_id) for run_id in ids]
    assert [run.data.params["train.seed"] for run in runs] == ["1", "2"]
    assert len({run.info.experiment_id for run in runs}) == 1 and runs[0].info.experiment_id != "0"

    # a params row reads `name A B`; the metrics table shows the names in one column and each metric's
    # values (one per run, in the URL's order) side by side in another
    expected = ["Comparing 2 Runs from 1 Experiment", *ids, *(run.info.run_name for run in runs),
                " ".join(["train.epochs", *(run.data.params["train.epochs"] for run in runs)]), "val_loss",
                " ".join(mlflow_ui_number(run.data.metrics["val_loss"]) for run in runs)]
    url = f"{team.url}/#/compare-runs?runs={url_json(ids)}&experiments={url_json([runs[0].info.experiment_id])}"
    # a tall window: the compare view renders only the rows in view, and val_loss sits far down a
    # training run's long metrics table
    with DevTools(chromium, tmp_path, credentials=READER, size=(1280, 8000)) as page:
        page.open(url)
        try:
            page.wait_for_text(expected)
        finally:
            page.screenshot(ARTIFACTS / "mlflow-team-compare.png")
    assert page.challenges >= 1, "the server never asked the browser for a password"


def test_concurrent_trainings_and_evaluates_against_the_server(team, race, monkeypatch):
    """Two trainings at once: two FINISHED runs, two versions; two evaluates at once: the better wins."""
    roots, trainings = race
    for result in trainings:
        ok(result)
        assert "IntegrityError" not in result.stderr and "duplicate key" not in result.stderr
    runs = [json.loads((root / "artifacts" / "train" / "run.json").read_text()) for root in roots]
    client = team.client(EDITOR, monkeypatch)
    assert [client.get_run(run["run_id"]).info.status for run in runs] == ["FINISHED", "FINISHED"]
    assert sorted(run["model_version"] for run in runs) == ["1", "2"]
    for result in together("evaluate", roots, team.env(EDITOR)):
        ok(result)
    scores = {run["model_version"]: float(client.get_model_version("race-model", run["model_version"]).tags[SCORE_TAG])
              for run in runs}
    champion = client.get_model_version_by_alias("race-model", "champion").version
    assert scores[str(champion)] == max(scores.values())
    assert not client.search_registered_models(filter_string=f"name = 'race-model{LOCK_SUFFIX}'")


def mlflow_ui_number(value: float) -> str:
    """A metric between 0.001 and 10 as MLflow's UI prints it (`Utils.formatMetric`: JS
    `Math.round(1000 * value) / 1000`, shortest digits)."""
    assert 0.001 <= abs(value) < 10, f"{value}: outside the range this rule covers"
    shown = math.floor(1000 * value + 0.5) / 1000
    return str(int(shown)) if shown.is_integer() else repr(shown)


def url_json(values: list[str]) -> str:
    """A list as the UI writes it into its own links (`#/compare-runs?runs=["id",...]`), URL-quoted."""
    return urllib.parse.quote(json.dumps(values, separators=(",", ":")))


def test_a_local_store_moves_onto_the_server(team, tmp_path, synthetic_data, monkeypatch):
    """`psyface server import`: runs (params, metric history, artifacts), versions and aliases arrive,
    the imported model predicts exactly as the local one, and importing again copies nothing."""
    root = make_workspace(tmp_path / "solo", synthetic_data, registry="solo-model", experiment="solo")
    local = tracking_env(root)
    ok(cli("train", cwd=root, env=local))
    local_predictions = ok(cli("predict", "data/images", "--model", "models:/solo-model@candidate", cwd=root, env=local))
    editor = team.env(EDITOR)
    imported = ok(cli("server", "import", str(root / "mlflow.db"), cwd=root, env=editor))
    assert "1 runs" in imported.stdout and "1 versions" in imported.stdout and "1 aliases" in imported.stdout
    served = ok(cli("predict", "data/images", "--model", "models:/solo-model@candidate", cwd=root, env=editor))
    assert served.stdout == local_predictions.stdout

    source = MlflowClient(local["MLFLOW_TRACKING_URI"], local["MLFLOW_TRACKING_URI"])
    original = source.search_runs([source.get_experiment_by_name("solo").experiment_id])[0]
    client = team.client(EDITOR, monkeypatch)
    copy = client.search_runs([client.get_experiment_by_name("solo").experiment_id])[0]
    assert copy.data.params == original.data.params and copy.info.status == "FINISHED"
    assert copy.data.tags["psyface.imported_from"] == original.info.run_id
    for key in original.data.metrics:
        history = [(m.step, m.value) for m in source.get_metric_history(original.info.run_id, key)]
        assert sorted(history) == sorted((m.step, m.value) for m in client.get_metric_history(copy.info.run_id, key))
    assert ([a.path for a in client.list_artifacts(copy.info.run_id)]
            == [a.path for a in source.list_artifacts(original.info.run_id)])
    again = ok(cli("server", "import", str(root / "mlflow.db"), cwd=root, env=editor))
    assert "0 runs" in again.stdout and "0 versions" in again.stdout


def test_server_killed_mid_training(team, tmp_path, synthetic_data, monkeypatch):
    """kill -9 of the server: the training fails with one clear line; after a restart the next training
    marks the orphaned run KILLED and finishes, and what was logged before the kill is still there."""
    root = make_workspace(tmp_path / "k", synthetic_data, registry="kill-model", experiment="kill", epochs=500, patience=500)
    training = spawn("train", root, team.env(EDITOR))
    client = team.client(EDITOR, monkeypatch)
    deadline = time.monotonic() + 600
    orphan = None
    while time.monotonic() < deadline and training.poll() is None:
        experiment = client.get_experiment_by_name("kill")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val_mean_r")) >= 2:
            orphan = runs[0].info.run_id
            break
        time.sleep(2)
    assert orphan is not None, "the training never logged two epochs"
    logged = [(m.step, m.value) for m in client.get_metric_history(orphan, "val_mean_r")]
    os.killpg(server_module.ServerDir(team.folder).state().mlflow_pid, signal.SIGKILL)
    one_error_line(finished(training, root, "train", timeout=600), "cannot reach", team.url)

    port = team.url.rsplit(":", 1)[1]
    ok(cli("server", "start", str(team.folder), "--port", port, "--workers", "2", "--timeout", "400"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=1, patience=5)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    after = ok(cli("train", cwd=root, env=team.env(EDITOR)))
    assert f"marked run {orphan} KILLED" in after.stdout
    old = client.get_run(orphan)
    assert old.info.status == "KILLED" and STALE_TAG in old.data.tags
    kept = [(m.step, m.value) for m in client.get_metric_history(orphan, "val_mean_r")]
    assert kept[: len(logged)] == logged
    new = json.loads((root / "artifacts" / "train" / "run.json").read_text())["run_id"]
    assert client.get_run(new).info.status == "FINISHED"

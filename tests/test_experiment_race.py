"""`tracking.ensure_experiment` on a real SQLite store: two processes creating the same experiment
at once (the one that loses the race must still log into it: MLflow's `set_experiment(name)` alone
leaves it on the Default experiment, seen as a server test's run in experiment 0), and where a new
experiment keeps its artifacts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.tracking.fluent
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from psyface import tracking


@pytest.fixture(autouse=True)
def own_active_experiment(monkeypatch) -> Iterator[None]:
    """MLflow keeps the active experiment in a global and exports it as MLFLOW_EXPERIMENT_ID: both
    are put back afterwards, or later tests in this worker would log into this test's experiment id
    (monkeypatch.delenv records nothing for a variable that is not set yet)."""
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    before = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    if before is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before


@pytest.fixture
def created_by_another_process_meanwhile(monkeypatch) -> None:
    """The store answers "no such experiment" until this process's own create meets the one another
    process made in between (which is made, for real, at the first lookup)."""
    lookup, create = SqlAlchemyStore.get_experiment_by_name, SqlAlchemyStore.create_experiment
    state = {"made": False, "clashed": False}

    def stale_lookup(self, name):
        if not state["made"]:
            state["made"] = True
            create(self, name)
        return lookup(self, name) if state["clashed"] else None

    def clashing_create(self, name, *args, **kwargs):
        state["clashed"] = True
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "get_experiment_by_name", stale_lookup)
    monkeypatch.setattr(SqlAlchemyStore, "create_experiment", clashing_create)


def runs_land_in(name: str) -> bool:
    experiment = tracking.ensure_experiment(name)
    with mlflow.start_run() as run:
        pass
    return run.info.experiment_id == experiment.experiment_id != "0"


@pytest.mark.slow  # a fresh SQLite store (MLflow's migrations) takes seconds
def test_the_loser_of_the_race_on_a_team_store_logs_into_the_experiment(tmp_path, monkeypatch,
                                                                       created_by_another_process_meanwhile):
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.use_tracking(uri)
    assert runs_land_in("race")


@pytest.mark.slow
def test_the_loser_of_the_race_on_the_project_store_neither_fails_nor_strays(tmp_path, monkeypatch,
                                                                            created_by_another_process_meanwhile):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.use_tracking()
    assert runs_land_in("race")


@pytest.mark.slow
def test_a_new_experiment_keeps_its_artifacts_in_the_project_store_when_run_from_a_copy(tmp_path, monkeypatch):
    """A queued DVC experiment runs in a temporary copy of the project (deleted afterwards) with
    DVC_ROOT naming the project: the experiment it creates must keep its artifacts in the project's
    mlruns/, not under the copy (MLflow's default: mlruns/ of the current folder)."""
    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "copy"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.DVC_ROOT, str(project))
    monkeypatch.chdir(copy)
    tracking.use_tracking()
    tracking.ensure_experiment("queued")
    with mlflow.start_run() as run:
        mlflow.log_text("kept", "note.txt")
    stored = Path(mlflow.artifacts.download_artifacts(run.info.artifact_uri + "/note.txt", dst_path=str(tmp_path)))
    assert stored.read_text() == "kept"
    assert (project / "mlruns" / "artifacts" / run.info.run_id / "artifacts" / "note.txt").is_file()
    assert not (copy / "mlruns").exists()


@pytest.mark.slow
def test_a_training_that_loses_the_race_to_insert_an_alias_still_sets_it(tmp_path, monkeypatch):
    """Two trainings against one server set `candidate` at once: MLflow's store looks the alias up and
    then inserts it, so the later insert fails with PostgreSQL's duplicate key (seen in CI on the team
    server). Forced here on a real store: the other training's alias is written, for real, between
    this one's lookup and insert; `set_alias` then succeeds and the alias names this training's version."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'team.db'}"
    tracking.use_tracking(uri)
    client = MlflowClient()
    client.create_registered_model("race-model")
    ours, theirs = (client.create_model_version("race-model", (tmp_path / name).as_uri()).version for name in ("a", "b"))
    original = RegistryStore.set_registered_model_alias
    lost = []

    def lose_the_first_race(self, name, alias, version):
        if not lost:
            lost.append(True)
            original(self, name, alias, theirs)  # the other training, in between
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"registered_model_alias_pk"')
        return original(self, name, alias, version)

    monkeypatch.setattr(RegistryStore, "set_registered_model_alias", lose_the_first_race)
    tracking.set_alias("race-model", tracking.CANDIDATE, ours)
    assert lost and client.get_model_version_by_alias("race-model", tracking.CANDIDATE).version == ours
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        tracking.set_alias("race-model", tracking.CANDIDATE, "99")  # any other error is not retried away

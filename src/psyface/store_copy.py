"""Copy a local MLflow store (mlruns/mlflow.db and its artifacts) onto a tracking server.

When a lab moves to `psyface server`, nobody should lose their history: `psyface server import
mlruns/` recreates, through MLflow's client API only (so the server's permissions apply and no
database is touched directly), every active experiment, run (params, tags, full metric histories,
dataset inputs, artifacts, status and times), logged model (MLflow 3 keeps model files there, not
in the run), registered model, version (tags, description) and alias.

Hand-written because MLflow ships no store-to-store copy for 3.x stores (the community
`mlflow-export-import` tool does not know LoggedModels). Re-running is safe: each copied object
carries `psyface.imported_from` (its id in the source), and objects already copied are skipped.
Run ids and version numbers are new on the server; the source ids are in that tag.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from psyface.errors import PsyfaceError

IMPORTED_TAG = "psyface.imported_from"
PARENT_TAG = "mlflow.parentRunId"
VERSIONS_TAG = "mlflow.modelVersions"  # the source's registrations; the server records its own
METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
PARAMS_PER_BATCH = 100


def local_store_uri(store: Path) -> str:
    """`sqlite:///...` of a store folder (holding mlflow.db) or of a .db file."""
    database = store / "mlflow.db" if store.is_dir() else store
    if not database.is_file():
        raise PsyfaceError(f"{store}: no MLflow SQLite store here (expected {database})")
    return f"sqlite:///{database.resolve()}"


def pages(search: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def copy_store(source_uri: str, target_uri: str) -> dict[str, int]:
    """Copy everything active from `source_uri` to `target_uri`; returns counts of what was copied."""
    import mlflow.artifacts
    from mlflow.entities import LoggedModelStatus, Metric, Param, ViewType
    from mlflow.tracking import MlflowClient

    from psyface.tracking import LOCK_SUFFIX

    source = MlflowClient(tracking_uri=source_uri, registry_uri=source_uri)
    target = MlflowClient(tracking_uri=target_uri, registry_uri=target_uri)
    counts = dict.fromkeys(("experiments", "runs", "logged models", "registered models", "versions", "aliases"), 0)
    run_ids: dict[str, str] = {}
    model_ids: dict[str, str] = {}
    for experiment in pages(source.search_experiments, view_type=ViewType.ACTIVE_ONLY):
        existing = target.get_experiment_by_name(experiment.name)
        experiment_id = existing.experiment_id if existing else target.create_experiment(experiment.name, tags=experiment.tags)
        counts["experiments"] += existing is None
        done = {run.data.tags[IMPORTED_TAG]: run.info.run_id for run in
                pages(target.search_runs, [experiment_id], filter_string=f"tags.`{IMPORTED_TAG}` LIKE '%'")}
        runs = list(pages(source.search_runs, [experiment.experiment_id]))
        runs.sort(key=lambda run: (PARENT_TAG in run.data.tags, run.info.start_time or 0))  # parents first
        for run in tqdm(runs, desc=f"runs of {experiment.name}", unit="run", leave=False):
            if run.info.run_id in done:
                run_ids[run.info.run_id] = done[run.info.run_id]
                continue
            tags = {**run.data.tags, IMPORTED_TAG: run.info.run_id}
            if PARENT_TAG in tags:
                tags[PARENT_TAG] = run_ids.get(tags[PARENT_TAG], tags[PARENT_TAG])
            copy = target.create_run(experiment_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
            new_id = copy.info.run_id
            run_ids[run.info.run_id] = new_id
            for part in chunks([Param(k, v) for k, v in run.data.params.items()], PARAMS_PER_BATCH):
                target.log_batch(new_id, params=part)
            history = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
                       for m in source.get_metric_history(run.info.run_id, key)]
            for part in chunks(history, METRICS_PER_BATCH):
                target.log_batch(new_id, metrics=part)
            if run.inputs and run.inputs.dataset_inputs:
                target.log_inputs(new_id, datasets=run.inputs.dataset_inputs)
            if source.list_artifacts(run.info.run_id):
                with tempfile.TemporaryDirectory() as folder:
                    target.log_artifacts(new_id, source.download_artifacts(run.info.run_id, "", folder))
            if run.info.status != "RUNNING":
                target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
            counts["runs"] += 1
        done_models = {model.tags.get(IMPORTED_TAG): model.model_id
                       for model in pages(target.search_logged_models, [experiment_id])}
        for model in pages(source.search_logged_models, [experiment.experiment_id]):
            if model.model_id in done_models:
                model_ids[model.model_id] = done_models[model.model_id]
                continue
            copy = target.create_logged_model(
                experiment_id, name=model.name, source_run_id=run_ids.get(model.source_run_id or ""),
                tags={**{k: v for k, v in model.tags.items() if k != VERSIONS_TAG}, IMPORTED_TAG: model.model_id},
                params=model.params, model_type=model.model_type)
            with tempfile.TemporaryDirectory() as folder:
                local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=folder)
                target.log_model_artifacts(copy.model_id, local)
            target.finalize_logged_model(copy.model_id, LoggedModelStatus.READY)
            model_ids[model.model_id] = copy.model_id
            counts["logged models"] += 1
    for registered in pages(source.search_registered_models):
        if registered.name.endswith(LOCK_SUFFIX):
            continue  # a promotion lock that was held when the store was copied
        name = registered.name
        if not list(target.search_registered_models(filter_string=f"name = '{name}'")):
            target.create_registered_model(name, tags=registered.tags, description=registered.description)
            counts["registered models"] += 1
        versions = {mv.tags.get(IMPORTED_TAG): mv.version for mv in pages(target.search_model_versions, f"name = '{name}'")}
        numbers: dict[str, str] = {}
        for version in sorted(pages(source.search_model_versions, f"name = '{name}'"), key=lambda mv: int(mv.version)):
            key = f"{version.model_id or version.source}"
            if key in versions:
                numbers[str(version.version)] = str(versions[key])
                continue
            # MLflow 3 names the logged model in the source (`models:/m-...`) and may leave model_id empty
            model_id = model_ids.get(version.model_id or version.source.removeprefix("models:/"))
            copy = target.create_model_version(
                name, source=f"models:/{model_id}" if model_id else version.source,
                run_id=run_ids.get(version.run_id or ""), tags={**version.tags, IMPORTED_TAG: key},
                description=version.description, model_id=model_id)
            numbers[str(version.version)] = str(copy.version)
            counts["versions"] += 1
        for alias, number in registered.aliases.items():
            target.set_registered_model_alias(name, alias, numbers[str(number)])
            counts["aliases"] += 1
    return counts

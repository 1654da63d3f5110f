"""Everything MLflow: where runs live, reopening a run, lineage tags, logging/loading models, aliases.

Later stages (evaluate, explain, report) find the training run through `artifacts/train/run.json`
(`read_run_file`), log into it with `open_run(run_id)` and load the network with `load_model(uri)`,
which reads safetensors weights + a JSON spec and never unpickles anything. Serving the registered
pyfunc (`mlflow models serve`) does unpickle: load registered models only from stores you trust.

With `MLFLOW_TRACKING_URI` set to a server nothing local is written (no `mlruns/`): experiments take
the server's proxied artifact root. `registry_lock` makes promotion atomic on any store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import pandas as pd
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from psyface.artifacts import RUN_FILE
from psyface.errors import PsyfaceError, server_refusal
from psyface.io import write_json_atomic
from psyface.model import (
    SPEC_FILE,
    WEIGHTS_FILE,
    AttributeEnsemble,
    AttributeNet,
    ModelSpec,
    load_trained,
    save_trained,
)
from psyface.run_safety import OWNER_TAG, owner_is_gone, owner_tags, sqlite_path

# SQLite backend inside mlruns/ (the file store is deprecated); artifacts beside it in mlruns/artifacts/ (ensure_experiment).
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MODEL_ARTIFACT = "model"
CANDIDATE = "candidate"
CHAMPION = "champion"
LOCK_SUFFIX = ".psyface-lock"  # registered model `<name>.psyface-lock` exists while a promotion runs
LOCK_OWNER_TAG = "psyface.lock_owner"
DVC_ROOT = "DVC_ROOT"  # set by DVC for every stage it runs
DVC_EXP_NAME_TAG = "dvc.exp_name"
# What the pyfunc needs at serving time (psyface itself must be importable: `--env-manager local`).
PYFUNC_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "safetensors", "mlflow")


@dataclass(frozen=True)
class TrainedRun:
    """The contract `artifacts/train/run.json` carries from `train` to the later stages."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    model_name: str
    model_version: str
    model_uri: str


def project_root() -> Path:
    """The project folder: `DVC_ROOT` when DVC runs the stage (for a queued experiment DVC points it
    at the project, not at the temporary copy under `.dvc/tmp/exps/` it runs in and deletes, so the
    runs are not lost), else the current folder."""
    return Path(os.environ.get(DVC_ROOT) or Path.cwd()).resolve()


def dvc_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to, from the environment DVC gives queued and `dvc exp run`
    stages: the same name in `dvc exp show` and in MLflow (also as the run name). Empty outside DVC."""
    names = {DVC_EXP_NAME_TAG: "DVC_EXP_NAME", "dvc.baseline_rev": "DVC_EXP_BASELINE_REV", "dvc.root": DVC_ROOT}
    return {tag: os.environ[variable] for tag, variable in names.items() if os.environ.get(variable)}


def store_dir() -> Path:
    """The default local store folder (SQLite database and artifacts)."""
    return project_root() / "mlruns"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` (a team server) if set, else the SQLite store in the project's mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store_dir().mkdir(exist_ok=True)
    if project_root() == Path.cwd().resolve():
        return DEFAULT_TRACKING_URI
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def ensure_experiment(name: str) -> mlflow.entities.Experiment:
    """Set the active experiment, creating it when it does not exist, also when another process
    creates it at the same moment.

    In a local SQLite store a new experiment keeps its artifacts beside the database (the project's:
    mlruns/artifacts/). MLflow's default is mlruns/ under the current folder, which for a queued DVC
    experiment is the temporary copy that DVC deletes afterwards, and with it the artifacts of every
    run of that experiment. Made active by id at the end: when two processes create the same
    experiment at once, MLflow's `set_experiment(name)` hands the loser the winner's experiment
    without making it active (its RESOURCE_ALREADY_EXISTS branch returns early), so the loser's runs
    would land in the Default experiment."""
    database = sqlite_path(mlflow.get_tracking_uri())
    if database is not None and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=(database.resolve().parent / "artifacts").as_uri())
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    return mlflow.set_experiment(experiment_id=mlflow.set_experiment(name).experiment_id)


def use_tracking(uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at `uri` or the default; returns the URI used."""
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def write_run_file(run: TrainedRun, path: Path = RUN_FILE) -> None:
    write_json_atomic(dataclasses.asdict(run), path)


def read_run_file(path: Path = RUN_FILE) -> TrainedRun:
    if not path.is_file():
        raise PsyfaceError(f"{path} not found: run the train stage first (`dvc repro train`)")
    return TrainedRun(**json.loads(path.read_text(encoding="utf-8")))


@contextmanager
def open_run(run_id: str, uri: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Log into an existing run; its final status is left as it was (adding artifacts is no outcome)."""
    use_tracking(uri)
    prior = MlflowClient().get_run(run_id).info.status
    active = mlflow.start_run(run_id=run_id)
    try:
        yield active
    finally:
        mlflow.end_run(status=prior if prior != "RUNNING" else "FINISHED")


def leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf of nested mappings (and lists of mappings, by index): the one
    walk behind MLflow's flat param and metric names."""
    if isinstance(data, Mapping):
        items: Any = data.items()
    elif isinstance(data, list | tuple) and any(isinstance(item, Mapping) for item in data):
        items = enumerate(data)
    else:
        yield prefix, data
        return
    for key, value in items:
        yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))


def flatten(mapping: Mapping[str, Any]) -> dict[str, str]:
    """Nested params -> {"train.lr": "0.001", ...} for `mlflow.log_params` (lists as JSON)."""
    return {name: json.dumps(value) if isinstance(value, list | tuple) else str(value) for name, value in leaves(mapping)}


def metric_values(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested results -> {"explain.gradcam....": 0.42, ...} for `mlflow.log_metrics`: numbers and
    booleans (as 0/1); undefined (NaN, infinite) and non-numeric values are left out."""
    return {name: float(value) for name, value in leaves(mapping, prefix)
            if isinstance(value, bool | int | float) and math.isfinite(value)}


def git_tags() -> dict[str, str]:
    """The commit the code came from and whether the working tree had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def data_hash(dvc_file: Path = Path("data.dvc")) -> str:
    """The dataset's DVC hash (the `md5` of `data.dvc`'s output), or 'untracked'."""
    if not dvc_file.is_file():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def log_model(net: AttributeNet | AttributeEnsemble, spec: ModelSpec, registry_name: str, input_example: pd.DataFrame) -> ModelVersion:
    """Log the network as a pyfunc (preprocessing included) into the active run and register it."""
    from psyface.serving import signature

    with tempfile.TemporaryDirectory() as folder:
        paths = save_trained(net, spec, Path(folder))
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={key: str(path) for key, path in paths.items()},
            signature=signature(spec),
            input_example=input_example,
            pip_requirements=[f"{package}=={version(package)}" for package in PYFUNC_REQUIREMENTS],
            registered_model_name=registry_name,
        )
    return MlflowClient().get_model_version(registry_name, str(info.registered_model_version))


def load_model(model_uri: str, uri: str | None = None) -> tuple[AttributeNet | AttributeEnsemble, ModelSpec]:
    """(network in eval mode, spec) from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...`
    or a local model folder; reads only safetensors + JSON, so it is safe on untrusted stores."""
    use_tracking(uri)
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts", dst_path=folder))
        except (MlflowException, OSError) as error:
            reason = server_refusal(error) or str(error).splitlines()[0]
            raise PsyfaceError(f"cannot load model {model_uri!r}: {reason}") from None
        if not (local / WEIGHTS_FILE).is_file():
            raise PsyfaceError(f"{model_uri!r} is not a psyface model (no {WEIGHTS_FILE} in its artifacts)")
        return load_trained(local / WEIGHTS_FILE, local / SPEC_FILE)


def alias_version(name: str, alias: str) -> ModelVersion | None:
    """The version of registered model `name` holding `alias`, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if server_refusal(error):
            raise  # a refused or unreachable server is not "no such alias"
        return None


def resolve_version(model_uri: str) -> ModelVersion:
    """The registered version `models:/NAME@ALIAS` or `models:/NAME/VERSION` points to now."""
    reference = model_uri.removeprefix("models:/").rstrip("/")
    name, alias = reference.split("@", 1) if "@" in reference else (reference.rsplit("/", 1)[0], "")
    try:
        if alias:
            return MlflowClient().get_model_version_by_alias(name, alias)
        return MlflowClient().get_model_version(name, reference.rsplit("/", 1)[1])
    except (MlflowException, IndexError) as error:
        reason = (server_refusal(error) if isinstance(error, MlflowException) else None) or str(error).splitlines()[0]
        raise PsyfaceError(f"no registered model version at {model_uri!r}: {reason}") from None


T = TypeVar("T")
UNIQUE_VIOLATIONS = ("duplicate key", "UniqueViolation", "UNIQUE constraint")  # PostgreSQL's and SQLite's words


def retry_insert_race(call: Callable[[], T], attempts: int = 3) -> T:
    """`call()`, again when it lost a race to insert a row another process inserted at the same moment.

    MLflow's stores write some rows (a logged dataset, a model alias) by checking that the row is
    missing and then inserting it, without an upsert, so two trainings against one server can both
    pass the check and the later insert fails with "duplicate key ... _pk". On the retry MLflow finds
    the row the other process wrote and reuses or updates it. MLflow has no retry for this."""
    for _ in range(attempts - 1):
        try:
            return call()
        except MlflowException as error:
            if not any(key in str(error) for key in UNIQUE_VIOLATIONS):
                raise
    return call()


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`; two trainings setting `candidate` at once both succeed (the later wins)."""
    retry_insert_race(lambda: MlflowClient().set_registered_model_alias(name, alias, version))


def tag_version(name: str, version: str, tags: Mapping[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


@contextmanager
def registry_lock(name: str, wait_s: float = 600, stale_s: float = 900) -> Iterator[None]:
    """Hold a mutex named after registered model `name`, valid across processes and machines.

    Clients of a tracking server speak only HTTP, so no database or file lock reaches them; the one
    atomic primitive every MLflow store offers is that registered-model names are unique. Creating
    `<name>.psyface-lock` succeeds for exactly one caller; the others retry until it is deleted. A
    lock whose owner process died on this host, or older than `stale_s` (clock of the server), is
    broken. Works the same on the local SQLite store."""
    client = MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    owner = owner_tags()[OWNER_TAG]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={LOCK_OWNER_TAG: owner},
                                           description=f"psyface promotion lock of {name!r}, held by {owner}")
            break
        except MlflowException as error:
            # RESOURCE_DOES_NOT_EXIST: our insert met the lock, and its holder released it before the
            # store looked the existing model up to report the clash (MLflow's create is not atomic
            # there). Either way the lock was taken a moment ago: try again.
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released between our two calls
        holder = held.tags.get(LOCK_OWNER_TAG, "")
        age = time.time() - held.creation_timestamp / 1000
        if owner_is_gone(holder) or age > stale_s:
            try:
                client.delete_registered_model(lock)
                print(f"broke the stale promotion lock of {name!r} (held by {holder} for {age:.0f} s)")
            except MlflowException:
                pass  # someone else broke it first
            continue
        if time.monotonic() > deadline:
            raise PsyfaceError(f"registered model {lock!r} (the promotion lock of {name!r}) has been held by {holder} "
                               f"for {age:.0f} s; if that process is gone, delete the registered model {lock!r}")
        time.sleep(0.2 + random.random() * 0.5)  # jitter: waiters do not retry in lockstep
    try:
        yield
    finally:
        client.delete_registered_model(lock)

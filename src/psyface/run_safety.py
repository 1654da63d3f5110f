"""Guards around the MLflow store for long or concurrent training runs.

- `check_store` fails in seconds, not after an hour of training, when the local store is not a
  writable folder or the disk cannot hold the checkpoints and the logged model.
- `initialise_store` creates a fresh SQLite store under a file lock (`store_lock`, also held by
  evaluate's promotion, a read-decide-write that concurrent queued experiments would race on): two workers starting at once
  would otherwise both run MLflow's table creation and one dies with "table already exists" or
  "database is locked" (MLflow itself sets a 20 s busy timeout for every later session).
- `owner_tags` / `close_stale_runs`: each run records the process that owns it; a RUNNING run whose
  owner process is gone (kill -9, power cut) is marked KILLED with a tag saying why, so it does not
  stay RUNNING forever, while a run owned by a live worker is left alone.

Against a tracking server (`MLFLOW_TRACKING_URI=http://...`, e.g. `psyface server`): the pre-flight
and the store lock are skipped (the server owns its storage, and `psyface server start` upgrades the
schema before it serves); stale-run marking works unchanged through the API, for owners on this host.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from psyface.errors import PsyfaceError
from psyface.io import process_alive

OWNER_TAG = "psyface.owner"  # "HOST:PID" of the process that runs (or ran) it
STALE_TAG = "psyface.stale"  # why the run was marked KILLED
SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (query string dropped), None for other stores."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX) :].split("?", 1)[0])


def check_writable(folder: Path, what: str, needed_bytes: int = 0) -> None:
    """Create `folder` if needed and prove it takes a file and has `needed_bytes` free."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".psyface-write-check-"):
            pass
    except OSError as error:
        raise PsyfaceError(
            f"{what} {folder} is not writable ({error.strerror or error}); fix its permissions or point "
            "MLFLOW_TRACKING_URI elsewhere before training"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise PsyfaceError(
            f"{what} {folder} has {free / 1e6:,.0f} MB free but this training needs about "
            f"{needed_bytes / 1e6:,.0f} MB (checkpoints and the logged model); free some space first"
        )


def check_store(uri: str, artifact_folder: Path, needed_bytes: int) -> None:
    """Preflight for a local SQLite store (a tracking server manages its own storage): the database
    folder and the artifact folder take files, and the artifact folder has room."""
    database = sqlite_path(uri)
    if database is None:
        return
    check_writable(database.parent, "the MLflow store folder")
    if database.exists() and not os.access(database, os.W_OK):
        raise PsyfaceError(f"the MLflow database {database} is read-only; fix its permissions before training")
    check_writable(artifact_folder, "the MLflow artifact folder", needed_bytes)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the local SQLite store's lock file (other processes on this machine wait); no-op for a
    tracking server, whose clients share no file system."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def initialise_store(uri: str) -> None:
    """Create the SQLite store's tables once, serialised across processes by the store lock."""
    if sqlite_path(uri) is None:
        return
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)


def owner_tags() -> dict[str, str]:
    return {OWNER_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def owner_is_gone(owner: str) -> bool:
    """True only when the owner ran on this host and its process no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: its liveness cannot be checked from here
    return not process_alive(int(pid))


def close_stale_runs(experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark this experiment's RUNNING runs whose owner process died KILLED (with `STALE_TAG`),
    except `keep` (the run about to be resumed). Returns the ids it closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        owner = run.data.tags.get(OWNER_TAG, "")
        if run.info.run_id == keep or not owner or not owner_is_gone(owner):
            continue
        client.set_tag(run.info.run_id, STALE_TAG,
                       f"owner process {owner} ended without closing the run; marked KILLED by {owner_tags()[OWNER_TAG]}")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def training_bytes(arch: str, head: str, n_outputs: int, networks: int = 1, last_conv_stride: int = 16) -> int:
    """Disk a training needs: per network a checkpoint (weights, best weights, two AdamW moments)
    plus the logged model, all float32. Counted on the meta device, so nothing is allocated (and a
    network the params cannot build fails here, before any run starts)."""
    import torch

    from psyface.model import build_model

    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(arch, head, n_outputs, last_conv_stride).parameters())
    return 5 * 4 * parameters * networks

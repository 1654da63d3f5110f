"""Issue 7: bad files at predict time, kill -9 during training, two workers on one SQLite store,
an unusable store caught before training, and the safety rules (no unpickling, loopback servers)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from bad_inputs import IMAGE_CASES
from conftest import SRC, run_cli
from factories import draw_face
from mlflow.tracking import MlflowClient
from workspace import make_workspace

from psyface import run_safety
from psyface import train as train_module
from psyface.images import MAX_IMAGE_PIXELS
from psyface.io import process_alive, replace_dir_atomic
from psyface.tracking import use_tracking

# One xdist worker runs this module so the two-worker store is trained once (`--dist loadgroup`).
pytestmark = [pytest.mark.xdist_group("robustness"), pytest.mark.slow]  # trains networks in subprocesses

MODEL = "tiny-model"
EPOCHS = 4


def start_training(root: Path, store: str) -> subprocess.Popen[str]:
    """`python -m psyface.train` in `root` as dvc would run it, logging into `store`."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "MLFLOW_TRACKING_URI": store}
    return subprocess.Popen([sys.executable, "-m", "psyface.train"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory, synthetic_data):
    """Two workers trained at once into one fresh SQLite store; version 1 then made champion."""
    base = tmp_path_factory.mktemp("robust")
    store = f"sqlite:///{base / 'shared.db'}"
    roots = [make_workspace(base / name, synthetic_data, registry=MODEL, epochs=EPOCHS) for name in ("a", "b")]
    workers = [start_training(root, store) for root in roots]
    outputs = [finish(worker) for worker in workers]
    use_tracking(store)
    MlflowClient().set_registered_model_alias(MODEL, "champion", "1")
    return base, store, roots, outputs


def test_two_workers_at_once_both_finish_with_their_own_runs(shared_store):
    _, store, roots, outputs = shared_store
    assert not any("database is locked" in stderr for _, stderr in outputs)
    use_tracking(store)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tests").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{MODEL}'")) == ["1", "2"]
    a, b = (pd.read_csv(root / "artifacts/train/history.csv") for root in roots)
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # concurrency changes nothing in the result


def test_sigkill_mid_training_resumes_to_the_uninterrupted_result(shared_store, synthetic_data):
    base, store, roots, _ = shared_store
    root = make_workspace(base / "killed", synthetic_data, registry=MODEL, epochs=EPOCHS)
    checkpoint = root / "artifacts/train/checkpoints/last.pt"
    worker = start_training(root, store)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    assert worker.returncode == -signal.SIGKILL and checkpoint.exists()
    killed_at = train_module.TrainState(**torch.load(checkpoint, map_location="cpu", weights_only=True))
    assert not killed_at.finished  # killed for real, before the end
    client = MlflowClient()
    assert client.get_run(killed_at.run_id).info.status == "RUNNING"

    stdout, _ = finish(start_training(root, store))
    assert f"resuming run {killed_at.run_id} from its checkpoint" in stdout
    run = client.get_run(killed_at.run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_epoch"]) == killed_at.epoch >= 1
    assert len(client.get_metric_history(run.info.run_id, "val_mean_r")) == EPOCHS
    pd.testing.assert_frame_equal(pd.read_csv(root / "artifacts/train/history.csv"),
                                  pd.read_csv(roots[0] / "artifacts/train/history.csv"), check_exact=True)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "3"


def test_two_processes_creating_one_fresh_store_both_succeed(tmp_path):
    """Unserialised, MLflow's table creation races (duplicate column / alembic errors, seen 3 of 3 tries)."""
    code = f"from psyface.run_safety import initialise_store; initialise_store('sqlite:///{tmp_path / 'fresh.db'}')"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors


def test_a_run_whose_process_died_is_marked_killed_a_live_one_is_kept(tmp_path):
    use_tracking(f"sqlite:///{tmp_path / 'm.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("stale", artifact_location=str(tmp_path / "artifacts"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = run_safety.owner_tags()[run_safety.OWNER_TAG].rpartition(":")[0]
    orphan = client.create_run(experiment, tags={run_safety.OWNER_TAG: f"{host}:{dead.stdout.strip()}"}).info.run_id
    live = client.create_run(experiment, tags=run_safety.owner_tags()).info.run_id
    resumable = client.create_run(experiment, tags={run_safety.OWNER_TAG: f"{host}:{dead.stdout.strip()}"}).info.run_id
    assert run_safety.close_stale_runs(experiment, keep=resumable) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert "ended without closing the run" in client.get_run(orphan).data.tags[run_safety.STALE_TAG]
    assert client.get_run(live).info.status == client.get_run(resumable).info.status == "RUNNING"


def test_a_resumed_run_logs_each_checkpointed_epoch_exactly_once(tmp_path):
    """Killed after epoch 2's checkpoint but before its metrics: the resume logs epoch 2, once (the
    log-then-checkpoint order logged an epoch twice when the kill fell between them: 5 of 4, CI)."""
    use_tracking(f"sqlite:///{tmp_path / 'm.db'}")
    record = {"train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3}
    history = [{"epoch": e, **record, "val_mean_r": 0.1 * e, "val_r_0": 0.1 * e} for e in (1, 2)]
    state = train_module.TrainState(epoch=2, history=history)
    with mlflow.start_run() as run:
        mlflow.log_metrics({"val_mean_r": 0.1, "val_r_happy": 0.1}, step=1)
        train_module._log_unlogged_epochs(state, ["happy"])
        train_module._log_unlogged_epochs(state, ["happy"])  # nothing left to log
    client = MlflowClient()
    for key in ("val_mean_r", "val_r_happy"):
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == [(1, 0.1), (2, 0.2)]


def test_a_killed_process_not_yet_reaped_counts_as_gone():
    """A zombie still answers kill(pid, 0); taken as alive, a server killed with -9 looked `already
    running` to the next `psyface server start` until init reaped it (CI, 2026-12-02)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # not reaped: we have not waited
        assert not process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_predict_rates_the_usable_files_and_names_each_bad_one(shared_store, tmp_path):
    base, store, _, _ = shared_store
    folder = tmp_path / "faces"
    folder.mkdir()
    draw_face(48).save(folder / "good.png")
    for case, (write, suffix, _) in IMAGE_CASES.items():
        write(folder / f"{case}{suffix}")
    result = run_cli("predict", "--model", f"models:/{MODEL}@champion", str(folder), "--out", str(tmp_path / "p.csv"),
                     cwd=base, env={"MLFLOW_TRACKING_URI": store})
    bad = {case: reason for case, (_, _, reason) in IMAGE_CASES.items() if reason != "ok"}
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # one line, after MLflow's download progress
    assert error.startswith(f"psyface: error: {len(bad)} of {len(IMAGE_CASES) + 1} image file(s) could not be used")
    for case, reason in bad.items():
        assert re.search(rf"\[{reason}\] \S*{case}\.", error), case
    assert f"MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,}" in error
    rated = {Path(f).stem for f in pd.read_csv(tmp_path / "p.csv")["file"]}
    assert rated == {"good"} | {case for case, (_, _, reason) in IMAGE_CASES.items() if reason == "ok"}

    missing = run_cli("predict", "--model", f"models:/{MODEL}@champion", str(folder / "nope.png"), cwd=base,
                      env={"MLFLOW_TRACKING_URI": store})
    assert missing.returncode == 2 and "nope.png: no such file or folder" in missing.stderr


@pytest.fixture
def workspace(tmp_path, monkeypatch, synthetic_data):
    root = make_workspace(tmp_path / "ws", synthetic_data, registry=MODEL)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns/mlflow.db'}")
    return root


def test_unwritable_store_stops_training_before_it_starts(workspace, capsys):
    (workspace / "mlruns").write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        train_module.main([])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert f"the MLflow store folder {workspace / 'mlruns'} is not writable" in error
    assert not (workspace / "artifacts/train/checkpoints").exists()


def test_full_disk_stops_training_before_it_starts(workspace, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_safety.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(SystemExit) as stop:
        train_module.main([])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert re.search(r"mlruns has 0 MB free but this training needs about [\d,]+ MB", error)
    assert not (workspace / "artifacts/train/checkpoints").exists()


def test_sigkill_while_an_output_folder_is_written_leaves_the_old_one_whole(tmp_path):
    output = tmp_path / "prepared"
    output.mkdir()
    (output / "images.npy").write_text("complete old output")
    code = (f"import os, signal; from pathlib import Path; from psyface.io import replace_dir_atomic\n"
            f"def fill(tmp):\n    (tmp / 'images.npy').write_text('half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"replace_dir_atomic(Path({str(output)!r}), fill)")
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)})
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in output.iterdir()] == ["images.npy"]
    assert (output / "images.npy").read_text() == "complete old output"
    replace_dir_atomic(output, lambda tmp: (tmp / "images.npy").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # the killed attempt's leftovers are gone


def test_nothing_unpickles_a_checkpoint_and_servers_bind_loopback():
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (SRC / "psyface").rglob("*.py"))
    loads = re.findall(r"torch\.load\(([^)]*)\)", sources)
    assert loads and all("weights_only=True" in call for call in loads)
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    servers = [line for line in readme.splitlines() if re.search(r"mlflow (ui|server|models serve)", line)]
    assert servers and all(re.search(r"(--host|-h) 127\.0\.0\.1", line) for line in servers)
    assert "only from stores you trust" in readme


def test_an_image_symlinked_out_of_the_dataset_is_refused(tiny_dataset, tmp_path):
    """Ids are plain names, and the resolved path (symlinks followed) must stay inside the dataset."""
    from psyface.validate import ValidateParams, validate_dataset

    outside = tmp_path / "elsewhere.png"
    draw_face(40).save(outside)
    target = tiny_dataset.image_path("f002")
    target.unlink()
    target.symlink_to(outside)
    [finding] = validate_dataset(tiny_dataset, ValidateParams(min_image_side=32)).findings
    assert (finding.id, finding.rule) == ("f002", "image:unsafe_id")
    assert "resolves outside the dataset folder" in finding.message

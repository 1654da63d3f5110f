"""Issue 18: DDP with torchrun (gloo on CPU) gives the one-process result and one tracked run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SRC, run_dvc
from mlflow.tracking import MlflowClient
from workspace import make_workspace

from psyface import tracking
from psyface.distributed import (
    Context,
    DistributedParams,
    gather,
    loss_weight,
    session,
    share,
)
from psyface.model import build_model, normalise, to_unit
from psyface.training import (
    Augmentation,
    Data,
    TrainParams,
    TrainState,
    augment,
    train_epochs,
)

# CPU DDP as the tests run it: one thread per rank, gloo on loopback.
DDP_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def contexts(world: int) -> list[Context]:
    return [Context(rank=rank, world_size=world) for rank in range(world)]


def test_shares_cover_a_batch_in_order_and_differ_by_at_most_one():
    for n in (0, 1, 5, 16, 17):
        for world in (1, 2, 3):
            parts = [share(n, c) for c in contexts(world)]
            assert [i for part in parts for i in range(n)[part]] == list(range(n))
            sizes = [len(range(n)[part]) for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_share_weighted_losses_average_to_the_one_process_mean():
    """What DDP computes (mean over ranks of weighted share means) is the mean over the batch."""
    values = torch.arange(7.0)
    for world in (1, 2, 3):
        weighted = [values[share(7, c)].mean() * loss_weight(len(values[share(7, c)]), 7, c) for c in contexts(world)
                    if len(values[share(7, c)])]
        assert torch.isclose(sum(weighted) / world, values.mean())


def test_a_share_of_a_batch_is_augmented_exactly_as_in_the_whole_batch():
    batch = torch.rand(5, 3, 16, 16)
    whole = augment(batch.clone(), Augmentation(), torch.Generator().manual_seed(4))
    for context in contexts(2):
        rows = share(5, context)
        part = augment(batch[rows].clone(), Augmentation(), torch.Generator().manual_seed(4), rows, 5)
        assert torch.allclose(part, whole[rows], atol=1e-6)


def test_queued_dvc_experiments_log_to_dvc_root_and_carry_its_names(tmp_path, monkeypatch):
    """DVC runs a queued experiment in a temporary copy and names the project in `DVC_ROOT`."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpa1b2"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    monkeypatch.setenv("DVC_EXP_NAME", "fuzzy-owls")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'project' / 'mlruns' / 'mlflow.db').resolve()}"
    assert tracking.dvc_tags() == {"dvc.exp_name": "fuzzy-owls", "dvc.baseline_rev": "0" * 40,
                                   "dvc.root": str(tmp_path / "project")}
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name)
    assert tracking.dvc_tags() == {}
    assert tracking.tracking_uri() == tracking.DEFAULT_TRACKING_URI


# ---------------------------------------------------------------- exactness: 2 gloo ranks vs 1 process

# Per case: architecture, training images, epochs. Batch 12: 41 images are 3 full batches and a last
# batch of 5, shared 3 + 2; 12 images are one step, where the gradient itself can be compared.
CASES = {"group_norm": ("test_efficientnet_gn", 41, 2), "batch_norm": ("test_efficientnet", 12, 1)}
PARAMS = {"batch_size": 12, "lr": 0.003, "warmup_epochs": 0.5, "seed": 3,
          "precision": "fp32"}  # bf16 autocast rounds a split batch differently: compare in fp32


def exactness_data(n: int) -> tuple[Data, Data]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n + 9, 32, 32, 3), dtype=np.uint8)
    targets = rng.standard_normal((n + 9, 2)).astype(np.float32)
    return Data(images[:n], targets[:n]), Data(images[n:], targets[n:])


def tiny_net(arch: str) -> torch.nn.Module:
    """Dropout off: each rank draws its own masks (see train_epochs), so no run could match with it."""
    torch.manual_seed(0)
    net = build_model(arch, "gap", 2).to(memory_format=torch.channels_last)
    net.pre_logits[2].p = 0.0
    return net


def exactness_fit(case: str, context: Context) -> tuple[torch.nn.Module, TrainState]:
    arch, n, epochs = CASES[case]
    torch.use_deterministic_algorithms(True)
    net = tiny_net(arch)
    train, val = exactness_data(n)
    state = train_epochs(net, train, val, TrainParams(arch=arch, epochs=epochs, **PARAMS), TrainState(),
                         torch.device("cpu"), context=context)
    return net, state


def first_gradients(state: TrainState) -> list[torch.Tensor]:
    """The gradient of the first optimiser step, read back from AdamW's first moment ((1 - beta1) g)."""
    moments = state.optimizer["state"]
    return [moments[i]["exp_avg"] / 0.1 for i in sorted(moments)]


def ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank, started by torch.multiprocessing.spawn, running every case; rank 0 saves what
    the test compares."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **DDP_ENV})
    torch.set_num_threads(1)
    results = {}
    with session(DistributedParams()) as context:
        for case in CASES:
            net, state = exactness_fit(case, context)
            parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
            results[case] = {"parameters": parameters, "history": state.history, "ranks": gather(parameters, context),
                             "gradients": first_gradients(state)}
    if rank == 0:
        torch.save(results, out)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def exactness(tmp_path_factory):
    """Per case: (what 2-rank DDP saved, the 1-process network and state), all on one thread."""
    out = tmp_path_factory.mktemp("exactness") / "ddp.pt"
    torch.multiprocessing.spawn(ddp_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case: (ddp[case], exactness_fit(case, Context())) for case in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_gloo_ranks_train_the_one_process_weights(exactness):
    """Per-sample normalisation (GroupNorm): 8 steps of DDP with the share-weighted loss give the
    one-process weights up to float summation order (measured: 3e-6 of the distance moved), the
    uneven last batch (3 + 2 of 5) included, and every rank holds the same weights."""
    ddp, (net, state) = exactness["group_norm"]
    single = dict(net.named_parameters())
    for rank_parameters in ddp["ranks"]:
        assert all(torch.equal(rank_parameters[name], ddp["parameters"][name]) for name in single)
    start = dict(tiny_net(CASES["group_norm"][0]).named_parameters())
    moved = sum(((single[k] - start[k]) ** 2).sum() for k in single).sqrt()
    gap = sum(((single[k] - ddp["parameters"][k]) ** 2).sum() for k in single).sqrt()
    assert moved > 0.1 and gap < 1e-4 * moved
    for name, value in single.items():
        torch.testing.assert_close(ddp["parameters"][name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
    assert len(ddp["history"]) == len(state.history) == 2
    for mine, theirs in zip(ddp["history"], state.history, strict=True):
        assert mine["val_mean_r"] == pytest.approx(theirs["val_mean_r"], abs=1e-5)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_with_batch_norm_each_rank_normalises_its_share(exactness):
    """BatchNorm on CPU uses each rank's statistics (SyncBatchNorm is CUDA-only). The equality that
    holds: DDP's gradient is the one-process gradient of a batch whose BN normalises each share on
    its own (ghost batch norm); it is not the plain one-process gradient."""
    ddp, _ = exactness["batch_norm"]
    arch, n, _ = CASES["batch_norm"]
    for rank_parameters in ddp["ranks"]:
        assert all(torch.equal(rank_parameters[name], ddp["parameters"][name]) for name in rank_parameters)
    net = tiny_net(arch).train()
    train, _ = exactness_data(n)
    generator = torch.Generator().manual_seed(PARAMS["seed"])
    index = torch.randperm(n, generator=generator)  # the loop's first batch: order, then augmentation draws
    batch = normalise(augment(to_unit(train.images[index.numpy()]), Augmentation(), generator))
    targets = torch.as_tensor(train.targets)[index]

    def gradient(shares: list[slice]) -> list[torch.Tensor]:
        net.zero_grad()
        loss = sum(F.mse_loss(net(batch[rows]), targets[rows]) * (rows.stop - rows.start) / n for rows in shares)
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        ghost = gradient([share(n, c) for c in contexts(2)])
        whole = gradient([slice(0, n)])
    finally:
        torch.set_num_threads(threads)

    def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True) if y.norm() > 0)

    assert relative(ddp["gradients"], ghost) < 1e-5  # float summation order only (measured 4e-8)
    assert relative(whole, ghost) > 0.05  # whole-batch statistics give another gradient (measured 1.5)


# ---------------------------------------------------------------- the stage under torchrun

def stage_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", **DDP_ENV}


def set_train(root: Path, **values: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def store(database: Path) -> MlflowClient:
    """A client of one store; the tests never set MLflow's process-wide URI (later tests rely on theirs)."""
    uri = f"sqlite:///{database}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(client: MlflowClient) -> list[mlflow.entities.Run]:
    experiment = client.get_experiment_by_name("tests")
    return sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)


def history(client: MlflowClient, run_id: str, metric: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


@pytest.mark.slow
def test_the_stage_on_two_processes_is_one_run_close_to_the_one_process_run(tmp_path, synthetic_data):
    """`python -m psyface.train` with nproc_per_node 2 launches torchrun itself: one FINISHED run,
    one point per epoch, one new model version, tagged with its world size and backend."""
    recipe = {"arch": "test_efficientnet_gn", "precision": "fp32", "epochs": 2}  # per-sample norm: comparable
    root = make_workspace(tmp_path / "project", synthetic_data, **recipe)
    for nproc in (1, 2):
        set_train(root, distributed={"nproc_per_node": nproc})
        result = subprocess.run([sys.executable, "-m", "psyface.train"], cwd=root, env=stage_env(root),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    client = store(root / "mlflow.db")
    single, ddp = runs(client)
    assert ddp.info.status == "FINISHED"
    assert ddp.data.tags["distributed.world_size"] == "2" and ddp.data.tags["distributed.backend"] == "gloo"
    assert single.data.tags["distributed.world_size"] == "1"
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'tiny-model'")) == ["1", "2"]
    assert client.get_model_version("tiny-model", "2").run_id == ddp.info.run_id
    assert len(history(client, ddp.info.run_id, "val_mean_r")) == len(history(client, single.info.run_id, "val_mean_r")) == 2
    # Only dropout differs (each rank draws its own masks). Measured on these 30 train / 9 val faces:
    # train loss within 2-8 %, val loss within 14 %; val r on 9 faces swings by up to 0.34 with the masks.
    assert history(client, ddp.info.run_id, "train_loss") == pytest.approx(
        history(client, single.info.run_id, "train_loss"), rel=0.15)
    assert history(client, ddp.info.run_id, "val_loss") == pytest.approx(history(client, single.info.run_id, "val_loss"), rel=0.25)


@pytest.mark.slow
def test_a_user_error_on_the_workers_is_one_line_per_rank_and_exit_2(tmp_path, synthetic_data):
    root = make_workspace(tmp_path / "project", synthetic_data, distributed={"nproc_per_node": 2})
    (root / "artifacts/prepared/meta.json").unlink()
    result = subprocess.run([sys.executable, "-m", "psyface.train"], cwd=root, env=stage_env(root),
                            capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors and all(line.startswith("psyface: error:") for line in errors), errors
    assert any("rank 1: " in line for line in errors) or len(errors) == 1


def workers_of(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The torchrun workers under `launcher`, by rank."""
    found = {}
    for child in launcher.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "psyface.train" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


@pytest.mark.slow
def test_kill_9_of_a_rank_then_rerun_with_torchrun_resumes_the_same_run(tmp_path, synthetic_data):
    epochs = 3
    root = make_workspace(tmp_path / "project", synthetic_data, epochs=epochs, distributed={"nproc_per_node": 2})
    checkpoint = root / "artifacts/train/checkpoints/last.pt"
    launcher = subprocess.Popen([sys.executable, "-m", "psyface.train"], cwd=root, env=stage_env(root),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = workers_of(psutil.Process(launcher.pid))
    assert set(workers) == {0, 1}, launcher.stderr.read() if launcher.poll() is not None else workers
    workers[1].send_signal(signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 1 and "Traceback" not in stderr.split("psyface: error:")[-1]
    assert "psyface: error: training worker(s) failed" in stderr and "1: -9" in stderr
    killed_at = TrainState(**torch.load(checkpoint, map_location="cpu", weights_only=True))
    assert 1 <= killed_at.epoch < epochs and not killed_at.finished
    client = store(root / "mlflow.db")
    [run] = runs(client)
    assert run.info.status in {"FAILED", "RUNNING"}  # rank 0 was stopped (SIGTERM) or killed by torchrun

    # The user runs torchrun directly this time (each process is then a worker: no second launch).
    rerun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "psyface.train"], cwd=root, env=stage_env(root), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming run {killed_at.run_id} from its checkpoint" in rerun.stdout
    [run] = runs(client)
    assert run.info.run_id == killed_at.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(killed_at.epoch)
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_mean_r")}
    assert steps == set(range(1, epochs + 1))
    assert [str(v.version) for v in client.search_model_versions("name = 'tiny-model'")] == ["1"]


# ---------------------------------------------------------------- sweeps: the DVC queue

@pytest.mark.slow
def test_two_queued_experiments_run_at_once_into_the_project_store_with_their_names(tmp_path, synthetic_data):
    """`dvc exp run --queue` + `dvc queue start -j 2`, each experiment on 2 torchrun workers: each
    runs in a temporary copy, and its one run reaches the project's store (DVC_ROOT) named after it."""
    root = make_workspace(tmp_path / "project", synthetic_data, epochs=1,
                          distributed={"nproc_per_node": 1})  # -S overrides only keys params.yaml has
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python -m psyface.train", "deps": ["artifacts/prepared", "data"], "params": ["train", "registry"],
        "outs": [{"artifacts/train/run.json": {"cache": False}}]}}}))
    (root / ".gitignore").write_text("mlruns/\n")
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(SRC), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **DDP_ENV,
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.org"})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run_dvc(root, "init", "-q", env=env)
    run_dvc(root, "add", "-q", "data", "artifacts/prepared", env=env)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=root, check=True, env=env)
    for seed in (1, 2):  # two torchrun jobs at once: their rendezvous ports must not collide
        run_dvc(root, "exp", "run", "--queue", "-S", f"train.seed={seed}", "-S", "train.distributed.nproc_per_node=2", env=env)
    run_dvc(root, "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + 600
    while True:
        status = run_dvc(root, "queue", "status", env=env)
        if not any(word in status for word in ("Queued", "Running")) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    names = set(run_dvc(root, "exp", "ls", "--name-only", env=env).split())
    client = store(root / "mlruns" / "mlflow.db")
    finished = runs(client)
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["dvc.exp_name"] for r in finished} == {r.info.run_name for r in finished} == names
    assert len(names) == 2
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert {r.data.tags["dvc.baseline_rev"] for r in finished} == {head}
    assert {r.data.params["train.seed"] for r in finished} == {"1", "2"}
    assert {r.data.tags["distributed.world_size"] for r in finished} == {"2"}
    assert len(client.search_model_versions("name = 'tiny-model'")) == 2
    assert "champion" not in client.get_registered_model("tiny-model").aliases  # only evaluate promotes


def test_the_store_lock_that_promotion_holds_makes_other_processes_wait(tmp_path):
    from psyface import run_safety

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'w')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)")
    lock_file = str(tmp_path / "mlflow.db.lock")
    with run_safety.store_lock(uri):
        assert subprocess.run([sys.executable, "-c", probe, lock_file]).returncode == 3  # another process waits
    assert subprocess.run([sys.executable, "-c", probe, lock_file]).returncode == 0

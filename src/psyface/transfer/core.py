"""Transfer learning from base tasks (Arbabzadah et al. 2016): base models, then a learning-curve sweep.

`train_base` trains the attribute network's architecture on one declared column of the dataset (a
category -> cross-entropy classification, a numeric column -> regression), registers it as
`{base_prefix}{COLUMN}` and moves `champion` under the evaluate stage's promotion rule. `run_sweep`
trains the attributes on nested fractions of the training split, from scratch and from each base
champion, over several seeds: one MLflow parent run, one nested run per cell, and `reports/transfer/`
(table, summary, learning curve, metrics) answering "when does transfer pay, and from which base".
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from psyface.artifacts import PREPARED_DIR, load_prepared
from psyface.config import Bound, NonNegativeInt, PositiveInt
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError
from psyface.io import write_csv_atomic, write_json_atomic
from psyface.model import ModelSpec, build_model, freeze_blocks, predict_standardised
from psyface.training import (
    REGRESSION,
    Data,
    Objective,
    TrainParams,
    TrainState,
    initialise,
    pearson_per_column,
    png_bytes,
    split_data,
    split_hash,
    standardised_splits,
    train_epochs,
)

BASE_DIR = Path("artifacts/transfer/base")
REPORT_DIR = Path("reports/transfer")
SCRATCH = "scratch"


@dataclass
class TransferParams:
    """The `transfer:` section. `train` is the recipe of every network (bases and sweep cells)."""

    bases: list[str] = field(default_factory=lambda: ["gender", "expression"])
    base_prefix: str = "psyface-base-"
    base_epochs: PositiveInt = 10
    min_steps: NonNegativeInt = 120  # a sweep cell with fewer optimiser steps than this trains more epochs (small fractions)
    image_size: NonNegativeInt = 0  # train at this side (area-downsampled from the prepared array); 0: as prepared
    attributes: list[str] = field(default_factory=list)  # sweep targets; empty: every attribute not a base
    fractions: list[Annotated[float, Bound(0, 1, open_low=True)]] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0, 1, 2])
    experiment: str = "psyface-transfer"
    map_images: PositiveInt = 64  # test faces explained by `maps`
    head_attribute: str = "trustworthy"  # binary (median) vs `head_classes` quantile-bin heads
    head_classes: Annotated[int, Bound(2)] = 4
    train: TrainParams = field(default_factory=lambda: TrainParams(arch="vgg16_bn_narrow", last_conv_stride=16, epochs=8,
                                                                   batch_size=32, lr=0.002, patience=8, freeze=0))


@dataclass(frozen=True)
class BaseTask:
    """A declared dataset column as a training task: classes for a category, none for a number."""

    column: str
    classes: list[str]

    @property
    def kind(self) -> str:
        return "classification" if self.classes else "regression"

    @property
    def outputs(self) -> list[str]:
        """Output names: one logit per class, or the column itself."""
        return [f"{self.column}={c}" for c in self.classes] if self.classes else [self.column]


def accuracy(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Share of rows whose largest logit is the target class (class index in column 0), as (1,)."""
    return np.array([float((predicted.argmax(1) == targets[:, 0]).mean())])


CLASSIFICATION = Objective(loss=lambda logits, targets: F.cross_entropy(logits, targets[:, 0].long()), score=accuracy)


def base_task(spec: DatasetSpec, table: pd.DataFrame, column: str) -> BaseTask:
    """The task a declared column defines: categories (sensitive features, labels) classify, attributes
    (or any other numeric column) regress. Unknown or non-numeric undeclared columns are errors."""
    categories = {**spec.sensitive_features, **spec.labels}
    if column in categories:
        return BaseTask(column, list(categories[column]))
    if column not in table:
        raise PsyfaceError(f"base task {column!r} is no column of the prepared table; declared: "
                           f"{sorted(categories) + spec.attribute_names}")
    if column not in spec.attributes and not pd.api.types.is_numeric_dtype(table[column]):
        raise PsyfaceError(f"base task {column!r} is neither numeric nor a declared category in dataset.yaml")
    return BaseTask(column, [])


def task_data(table: pd.DataFrame, images: np.ndarray, task: BaseTask) -> tuple[dict[str, Data], float, float]:
    """Per split, the rows with a value: class indices, or values standardised by the train split."""
    values = table[task.column]
    if task.classes:
        unknown = sorted(set(values.dropna().astype(str)) - set(task.classes))
        if unknown:
            raise PsyfaceError(f"column {task.column!r} has values {unknown} outside its declared classes {task.classes}")
        numbers = values.astype(str).map({c: i for i, c in enumerate(task.classes)}).where(values.notna())
    else:
        numbers = pd.to_numeric(values, errors="coerce")
    data, mean, std = standardised_splits(images, numbers.to_numpy(np.float64)[:, None], table["split"].to_numpy(),
                                          standardise=not task.classes, what=f"base task {task.column!r}")
    return data, mean[0], std[0]


def downsampled(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images area-averaged to `size` (unchanged for 0 or the same size)."""
    if size in (0, images.shape[1]):
        return np.asarray(images)
    if size > images.shape[1]:
        raise PsyfaceError(f"transfer.image_size {size} exceeds the prepared {images.shape[1]}px")
    batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float()
    small = F.interpolate(batch, size=(size, size), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_score(net: torch.nn.Module, data: Data, objective: Objective, batch_size: int) -> float:
    predicted = predict_standardised(net, data.images, batch_size, torch.device("cpu"), autocast=False)
    return float(objective.score(predicted, data.targets).mean())


def fit(net: torch.nn.Module, train: Data, val: Data, params: TrainParams, objective: Objective,
        on_epoch=lambda state: None, label: str = "") -> TrainState:
    """Train on CPU/GPU from a fresh state and leave `net` holding its best-validation weights."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device, memory_format=torch.channels_last)
    state = train_epochs(net, train, val, params, TrainState(), device, on_epoch=on_epoch, label=label, objective=objective)
    net.load_state_dict(state.best_model)
    return state


def _log_epoch(state: TrainState, score_name: str) -> None:
    import mlflow

    record = state.history[-1]
    mlflow.log_metrics({"train_loss": record["train_loss"], "val_loss": record["val_loss"],
                        f"val_{score_name}": record["val_mean_r"]}, step=state.epoch)


# ---------------------------------------------------------------- stage: one base model


def train_base(column: str, params: TransferParams) -> dict[str, object]:
    """Train, log, register the base model of `column`; promote it to champion if it beats the
    current one (psyface.promotion); returns what `artifacts/transfer/base/COLUMN.json` records."""
    import mlflow

    from psyface import promotion, tracking
    from psyface.promotion import Score

    torch.use_deterministic_algorithms(not torch.cuda.is_available())
    prepared, dataset = load_prepared(PREPARED_DIR), load_dataset(DATA_DIR)
    task = base_task(dataset, prepared.table, column)
    images = downsampled(prepared.images, params.image_size)
    data, mean, std = task_data(prepared.table, images, task)
    objective, score_name = (CLASSIFICATION, "accuracy") if task.classes else (REGRESSION, "pearson_r")
    recipe = dataclasses.replace(params.train, epochs=params.base_epochs, init="scratch", freeze=0)
    spec = ModelSpec(arch=recipe.arch, head=recipe.head, attributes=task.outputs, image_size=int(images.shape[1]),
                     target_mean=[mean] * len(task.outputs), target_std=[std] * len(task.outputs), last_conv_stride=recipe.last_conv_stride)
    name = f"{params.base_prefix}{column}"
    tracking.use_tracking()
    tracking.ensure_experiment(params.experiment)
    with mlflow.start_run(run_name=f"base-{column}") as run:
        here_hashes = {"data_hash": tracking.data_hash(), "split_hash": split_hash(prepared.table)}
        mlflow.set_tags({**tracking.git_tags(), **here_hashes, "base_task": column, "task_kind": task.kind})
        mlflow.log_params(tracking.flatten({"transfer": {"train": dataclasses.asdict(recipe)}, "column": column}))
        torch.manual_seed(recipe.seed)
        net = build_model(recipe.arch, recipe.head, len(task.outputs), recipe.last_conv_stride)
        fit(net, data["train"], data["val"], recipe, objective, on_epoch=lambda s: _log_epoch(s, score_name),
            label=f"base {column} ")
        score = test_score(net.cpu(), data["test"], objective, recipe.batch_size * 2)
        mlflow.log_metric(f"test_{score_name}", score)
        example = pd.DataFrame({"image": [png_bytes(np.asarray(data["val"].images[0]))]})
        version = tracking.log_model(net, spec, name, example)
    tracking.set_alias(name, tracking.CANDIDATE, version.version)
    here = Score(score, here_hashes["data_hash"], here_hashes["split_hash"])
    promote, reason = promotion.promote(name, version.version, here, eligible=math.isfinite(score), score_name=score_name,
                                        tags={**here_hashes, "score_metric": score_name, "base_task": column,
                                              "run_id": run.info.run_id})
    print(f"transfer base {column}: test {score_name} {score:.3f}; v{version.version} "
          f"{'-> champion' if promote else 'not promoted'} ({reason})")
    record = {"column": column, "kind": task.kind, "classes": task.classes, f"test_{score_name}": score,
              "model_uri": f"models:/{name}/{version.version}", "promoted": promote, "run_id": run.info.run_id}
    write_json_atomic(record, BASE_DIR / f"{column}.json")
    return record


# ---------------------------------------------------------------- stage: the sweep


def sweep_targets(dataset: DatasetSpec, params: TransferParams) -> list[str]:
    """The attributes the sweep predicts: as configured, else every attribute that is no base task."""
    targets = params.attributes or [a for a in dataset.attribute_names if a not in params.bases]
    unknown = [a for a in targets if a not in dataset.attributes]
    if unknown:
        raise PsyfaceError(f"transfer.attributes {unknown} are not attributes of {dataset.name!r}")
    return targets


def nested_subsets(n: int, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Training-row indices per fraction; smaller fractions are prefixes of larger ones (one seeded
    order), so a learning curve adds data instead of redrawing it."""
    order = np.random.default_rng(seed).permutation(n)
    return {f: np.sort(order[: max(2, round(f * n))]) for f in fractions}


def cell_recipe(params: TransferParams, init: str, seed: int, n_train: int) -> TrainParams:
    """The training recipe of one sweep cell: `params.train` from `init` with `seed`, for `train.epochs`
    or more where that gives fewer than `min_steps` optimiser steps, so the small fractions of a
    learning curve are not compared half-trained."""
    steps_per_epoch = math.ceil(n_train / params.train.batch_size)
    epochs = max(params.train.epochs, math.ceil(params.min_steps / steps_per_epoch))
    return dataclasses.replace(params.train, init=init, seed=seed, epochs=epochs)


def run_cell(data: dict[str, Data], subset: np.ndarray, recipe: TrainParams,
             attributes: list[str]) -> tuple[np.ndarray, dict[str, str], TrainState, torch.nn.Module]:
    """One sweep cell: build, initialise (`recipe.init`), freeze, fit on `subset` of train; test r per attribute."""
    torch.manual_seed(recipe.seed)
    net = build_model(recipe.arch, recipe.head, len(attributes), recipe.last_conv_stride)
    tags = initialise(net, recipe, attributes)
    freeze_blocks(net, recipe.freeze)
    train = Data(data["train"].images[subset], data["train"].targets[subset])
    state = fit(net, train, data["val"], recipe, REGRESSION, label=f"{recipe.init} seed {recipe.seed} n={len(subset)} ")
    predicted = predict_standardised(net.cpu(), data["test"].images, recipe.batch_size * 2, torch.device("cpu"), False)
    return pearson_per_column(predicted, data["test"].targets), tags, state, net


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and seed SD of test mean r per (fraction, init), and the gain over scratch (paired by seed)."""
    summary = table.groupby(["fraction", "init"], sort=False)["mean_r"].agg(mean_r="mean", sd_r="std", n_seeds="count").reset_index()
    scratch = table[table["init"] == SCRATCH].set_index(["fraction", "seed"])["mean_r"]
    gains = table.assign(gain=table["mean_r"].to_numpy() - scratch.reindex(pd.MultiIndex.from_frame(table[["fraction", "seed"]])).to_numpy())
    gain = gains.groupby(["fraction", "init"], sort=False)["gain"].agg(gain_vs_scratch="mean", gain_sd="std").reset_index()
    return summary.merge(gain, on=["fraction", "init"])


def curve_figure(summary: pd.DataFrame, n_train: int) -> Figure:
    figure = Figure(figsize=(6.5, 4.2))  # no pyplot: no global figure state
    axis = figure.subplots()
    for init, part in summary.groupby("init", sort=False):
        axis.errorbar(part["fraction"] * 100, part["mean_r"], yerr=part["sd_r"].fillna(0), marker="o", capsize=3,
                      label=init)
    axis.set(xscale="log", xlabel=f"training fraction (% of {n_train} images)", ylabel="test mean Pearson r",
             title="transfer learning curve (mean ± SD over seeds)")
    axis.set_xticks(sorted(summary["fraction"].unique() * 100), [f"{f:g}" for f in sorted(summary["fraction"].unique() * 100)])
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def run_sweep(params: TransferParams) -> pd.DataFrame:
    """Every (fraction, init, seed) cell as a nested run under one parent; writes reports/transfer/."""
    import mlflow

    from psyface import tracking

    started = time.monotonic()
    torch.use_deterministic_algorithms(not torch.cuda.is_available())
    prepared, dataset = load_prepared(PREPARED_DIR), load_dataset(DATA_DIR)
    attributes = sweep_targets(dataset, params)
    data, _, _ = split_data(downsampled(prepared.images, params.image_size), prepared.table, attributes)
    inits = [SCRATCH, *(f"models:/{params.base_prefix}{base}@{tracking.CHAMPION}" for base in params.bases)]
    tracking.use_tracking()
    tracking.ensure_experiment(params.experiment)
    rows = []
    with mlflow.start_run(run_name="transfer-sweep"):
        mlflow.set_tags({**tracking.git_tags(), "data_hash": tracking.data_hash(), "split_hash": split_hash(prepared.table)})
        mlflow.log_params(tracking.flatten({"transfer": dataclasses.asdict(params)}))
        for seed in params.seeds:
            subsets = nested_subsets(len(data["train"].images), params.fractions, seed)
            for fraction in params.fractions:
                for init in inits:
                    recipe = cell_recipe(params, init, seed, len(subsets[fraction]))
                    label = "scratch" if init == SCRATCH else init.removeprefix(f"models:/{params.base_prefix}").split("@")[0]
                    with mlflow.start_run(run_name=f"{label}-{fraction:g}-s{seed}", nested=True):
                        r, tags, state, _ = run_cell(data, subsets[fraction], recipe, attributes)
                        mlflow.set_tags({**tags, "fraction": f"{fraction:g}", "seed": str(seed), "base": label,
                                         "freeze_blocks": str(recipe.freeze)})
                        metrics = {f"test_r_{a}": float(v) for a, v in zip(attributes, r, strict=True)}
                        metrics.update(test_mean_r=float(r.mean()), best_val_mean_r=state.best_r,
                                       n_train=len(subsets[fraction]), epochs=recipe.epochs)
                        mlflow.log_metrics(metrics)
                    rows.append({"fraction": fraction, "init": label, "seed": seed, "n_train": len(subsets[fraction]),
                                 "epochs": recipe.epochs,
                                 "base_version": tags.get("init.model_version", ""), "mean_r": float(r.mean()),
                                 **{f"r_{a}": float(v) for a, v in zip(attributes, r, strict=True)}})
        table = pd.DataFrame(rows)
        summary = summarise(table)
        wall = time.monotonic() - started
        write_report(table, summary, attributes, len(data["train"].images), params, wall)
        mlflow.log_metrics({"wall_s": wall})
        mlflow.log_artifacts(str(REPORT_DIR), "transfer")
    return summary


def write_report(table: pd.DataFrame, summary: pd.DataFrame, attributes: list[str], n_train: int,
                 params: TransferParams, wall_s: float) -> None:
    """table.csv (every cell), summary.csv, curve.png and metrics.json (stable keys for dvc metrics)."""
    write_csv_atomic(table, REPORT_DIR / "table.csv")
    write_csv_atomic(summary, REPORT_DIR / "summary.csv")
    curve_figure(summary, n_train).savefig(REPORT_DIR / "curve.png", dpi=110)
    smallest = min(params.fractions)
    bases = summary[(summary["fraction"] == smallest) & (summary["init"] != SCRATCH)]
    best = bases.loc[bases["gain_vs_scratch"].idxmax()] if len(bases) else None
    metrics = {"transfer": {
        "attributes": attributes, "n_train_full": n_train, "arch": params.train.arch, "epochs": params.train.epochs,
        "min_steps": params.min_steps,
        "image_size": params.image_size,
        "seeds": params.seeds, "wall_s": round(wall_s, 1),
        "curve": {f"{row.fraction:g}": {} for row in summary.itertuples()},
        "smallest_fraction": {"fraction": smallest, "best_base": None if best is None else best["init"],
                              "gain_vs_scratch": None if best is None else float(best["gain_vs_scratch"]),
                              "gain_sd": None if best is None else float(best["gain_sd"])}}}
    for row in summary.itertuples():
        metrics["transfer"]["curve"][f"{row.fraction:g}"][row.init] = {
            "mean_r": float(row.mean_r), "sd_r": float(row.sd_r),
            "gain_vs_scratch": float(row.gain_vs_scratch)}
    write_json_atomic(metrics, REPORT_DIR / "metrics.json")

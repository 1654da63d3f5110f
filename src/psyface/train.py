"""Stage `train`: fit the network on the prepared array, track it in MLflow, register a candidate.

The core (`psyface.training`: the recipe, `train_epochs`, checkpoints) takes tensors and returns a
`TrainState`; this stage around it reads `artifacts/prepared/`, checkpoints every epoch (an interrupted run resumes bit-identically),
logs to MLflow and registers the model with alias `candidate`. Multi-task by default: one network,
every attribute, standardised targets (train mean/std travel in the ModelSpec). `per_attribute: true`
trains one network per attribute (the peer's protocol) as nested runs; `mode: probe` fits ridge heads on
a frozen backbone's cached features (`psyface.probe`); `split.folds` adds cross-validated figures. With
`distributed.nproc_per_node > 1` (or under torchrun) the same loop runs data-parallel with DDP
(`psyface.distributed`), still one run: only rank 0 tracks and checkpoints.
"""

from __future__ import annotations

import argparse
import signal
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from psyface.artifacts import (
    CHECKPOINT_DIR,
    CV_FILE,
    HISTORY_FILE,
    PREPARED_DIR,
    TRAIN_FEATURES_DIR,
    load_prepared,
)
from psyface.config import (
    PARAMS_FILE,
    load_section,
    read_yaml,
)
from psyface.dataset.layout import DATA_DIR, load_dataset
from psyface.distributed import (
    Context,
    default_device,
    from_main,
    is_worker,
    launch,
    session,
)
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_atomic, write_json_atomic
from psyface.model import (
    AttributeEnsemble,
    ModelSpec,
    ProbeNet,
    build_model,
    build_probe,
    freeze_blocks,
    predict_standardised,
)
from psyface.probe import ProbeParams
from psyface.resampling import face_groups
from psyface.training import (
    Data,
    Normalisation,
    TrainParams,
    TrainState,
    check_init,
    fingerprint,
    initialise,
    load_checkpoint,
    normalisation_of,
    pearson_per_column,
    png_bytes,
    save_checkpoint,
    split_data,
    split_hash,
    standardised_splits,
    train_epochs,
    uses_bf16,
)


@dataclass
class RegistryParams:
    name: str = "psyface-vgg16"


def learning_curves_figure(history: pd.DataFrame, attributes: list[str]) -> Figure:
    figure = Figure(figsize=(11, 4))  # no pyplot: no global figure state to clean up
    left, right = figure.subplots(1, 2)
    left.plot(history["epoch"], history["train_loss"], label="train")
    left.plot(history["epoch"], history["val_loss"], label="val")
    left.set(xlabel="epoch", ylabel="MSE (standardised)", title="loss")
    left.legend()
    for attribute in attributes:
        right.plot(history["epoch"], history[f"val_r_{attribute}"], label=attribute)
    right.plot(history["epoch"], history["val_mean_r"], "k--", label="mean")
    right.set(xlabel="epoch", ylabel="Pearson r", title="validation r", ylim=(-0.2, 1))
    right.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def run_training(params: TrainParams, registry: RegistryParams, all_params: dict[str, Any],
                 context: Context | None = None) -> None:
    """The stage: data -> (resumable) training -> MLflow run + registered candidate -> run.json.

    Under DDP every rank runs this; only rank 0 reads and writes checkpoints (the state it resumes
    from is broadcast) and touches MLflow, so one training is one run whatever the world size."""
    import mlflow

    from psyface import run_safety, tracking

    TRAIN_FEATURES_DIR.mkdir(parents=True, exist_ok=True)  # a DVC output in both modes (empty when fine-tuning)
    context = context or Context(device=default_device())
    if params.mode == "probe":
        if context.enabled:
            raise PsyfaceError("train.mode probe fits its heads in one process: set train.distributed.nproc_per_node: 1")
        run_probe(params, registry, all_params)
        return
    leader = context.is_main
    device = context.device
    torch.use_deterministic_algorithms(device.type == "cpu")  # bit-identical reruns and resumes on CPU
    prepared = load_prepared(PREPARED_DIR)
    images, table = prepared.images, prepared.table
    dataset = load_dataset(DATA_DIR)
    attributes = dataset.attribute_names
    data, mean, std = split_data(images, table, attributes)
    spec = ModelSpec(arch=params.arch, head=params.head, attributes=attributes, image_size=int(images.shape[1]),
                     target_mean=mean, target_std=std, per_attribute=params.per_attribute,
                     last_conv_stride=params.last_conv_stride,
                     scales={a: list(dataset.attributes[a].scale) for a in attributes})
    check_init(params)
    outputs, networks = (1, len(attributes)) if params.per_attribute else (len(attributes), 1)
    print_ = fingerprint(params)
    tasks = [(a, [i]) for i, a in enumerate(attributes)] if params.per_attribute else [("", list(range(len(attributes))))]
    checkpoints = {task: CHECKPOINT_DIR / (f"last-{task}.pt" if task else "last.pt") for task, _ in tasks}
    resume_id = None
    if leader:
        run_safety.check_store(tracking.tracking_uri(), tracking.store_dir(),
                               run_safety.training_bytes(params.arch, params.head, outputs, networks,
                                                        params.last_conv_stride))
        states = {task: load_checkpoint(path, print_) for task, path in checkpoints.items()}
        uri = tracking.use_tracking()
        run_safety.initialise_store(uri)
        if params.init.startswith("models:/"):
            tracking.resolve_version(params.init)  # a missing source fails here, before a run opens
        experiment = tracking.ensure_experiment(params.experiment)
        resume_id = next((s.run_id for s in states.values() if s and s.run_id), None)
        if resume_id and not _run_exists(resume_id):
            resume_id, states = None, dict.fromkeys(states)
        for stale in run_safety.close_stale_runs(experiment.experiment_id, keep=resume_id):
            print(f"marked run {stale} KILLED: its training process is gone")
    states = from_main(states if leader else None, context)
    dvc = tracking.dvc_tags()
    opened = (mlflow.start_run(run_id=resume_id, log_system_metrics=True,
                               run_name=None if resume_id else dvc.get(tracking.DVC_EXP_NAME_TAG)) if leader else nullcontext())
    with opened as run:
        if leader:
            mlflow.set_tags({**run_safety.owner_tags(), **context.tags()})
        if leader and resume_id:
            print(f"resuming run {resume_id} from its checkpoint")
            mlflow.set_tag("resumed_from_epoch", str(min((s.epoch for s in states.values() if s), default=0)))
        elif leader:
            _log_run_inputs(params, all_params, table, dataset.name, device)
        run_id = from_main(run.info.run_id if leader else "", context)
        networks = []
        for task, columns in tasks:
            torch.manual_seed(params.seed)
            net = build_model(params.arch, params.head, len(columns), params.last_conv_stride).to(
                device, memory_format=torch.channels_last)
            state = states[task] or TrainState(run_id=run_id, fingerprint=print_)
            names = [attributes[c] for c in columns]
            train = Data(data["train"].images, data["train"].targets[:, columns])
            val = Data(data["val"].images, data["val"].targets[:, columns])
            child = (mlflow.start_run(run_name=task, nested=True, run_id=_child_run(run_id, task))
                     if task and leader else nullcontext())
            with child:
                if task and leader:
                    mlflow.set_tag("attribute", task)
                if not state.model and leader:  # DDP copies rank 0's initial weights to the other ranks
                    mlflow.set_tags(initialise(net, params, names))
                if leader:  # read back, so a resumed run keeps the normalisation its weights came with
                    spec.input_mean, spec.input_std = map(list, normalisation_of(_run_tags()))
                    mlflow.set_tag("freeze_blocks", str(params.freeze))
                spec.input_mean, spec.input_std = from_main((spec.input_mean, spec.input_std) if leader else None, context)
                freeze_blocks(net, params.freeze)
                if leader and state.history:
                    _log_unlogged_epochs(state, names)
                after = (lambda s, p=checkpoints[task], n=names: _after_epoch(s, p, n)) if leader else (lambda s: None)
                state = train_epochs(net, train, val, params, state, device, on_epoch=after,
                                     label=f"{task} " if task else "", normalisation=(spec.input_mean, spec.input_std),
                                     context=context)
                if leader:
                    mlflow.log_metrics({"best_val_mean_r": state.best_r, "best_epoch": state.best_epoch})
            net.load_state_dict(state.best_model)
            networks.append((net, state, checkpoints[task]))
        if not leader:
            return
        final = networks[0][0] if not params.per_attribute else AttributeEnsemble([n for n, _, _ in networks])
        history = _write_history(networks, attributes, params.per_attribute)
        mlflow.log_figure(learning_curves_figure(history, attributes), "plots/learning_curves.png")
        mlflow.log_artifact(str(HISTORY_FILE), "train")
        cross_validate(params, images, table, attributes, face_groups(table, dataset.identity_column), device)
        version = _register(final, spec, registry, data["val"].images[0], table, run.info.run_id)
        for _, state, path in networks:
            state.finished = True
            save_checkpoint(state, path)
        _write_run(uri, experiment.experiment_id, run.info.run_id, registry.name, str(version.version))


def _log_run_inputs(params: TrainParams, all_params: dict[str, Any], table: pd.DataFrame, dataset: str,
                    device: torch.device) -> None:
    """Params, lineage tags and the training table of a fresh run."""
    import mlflow

    from psyface import tracking

    mlflow.log_params(tracking.flatten(all_params))
    mlflow.set_tags({**tracking.git_tags(), **tracking.dvc_tags(), "data_hash": tracking.data_hash(), "dataset": dataset,
                     "split_hash": split_hash(table), "device": device.type,
                     "autocast": "bf16" if uses_bf16(params.precision, device) else "fp32"})
    with warnings.catch_warnings():  # MLflow registers two equivalent local-file source types
        warnings.simplefilter("ignore", UserWarning)
        source = mlflow.data.from_pandas(table, source=str(PREPARED_DIR.resolve()), name=dataset)
    # Two trainings logging the same dataset at once race on the server's dataset row ("dataset_pk").
    tracking.retry_insert_race(lambda: mlflow.log_input(source, context="training"))


def _register(final: torch.nn.Module, spec: ModelSpec, registry: RegistryParams, example_image: np.ndarray,
              table: pd.DataFrame, run_id: str) -> Any:
    """Log the pyfunc into the active run, register it with alias `candidate`, tag its lineage."""
    from psyface import tracking

    example = pd.DataFrame({"image": [png_bytes(example_image)]})
    version = tracking.log_model(final.cpu(), spec, registry.name, example)
    tracking.set_alias(registry.name, tracking.CANDIDATE, version.version)
    tracking.tag_version(registry.name, version.version, {"data_hash": tracking.data_hash(),
                                                         "split_hash": split_hash(table), "run_id": run_id})
    return version


def _write_run(uri: str, experiment_id: str, run_id: str, model_name: str, version: str) -> None:
    from psyface import tracking

    tracking.write_run_file(tracking.TrainedRun(
        tracking_uri=uri, experiment_id=experiment_id, run_id=run_id, model_name=model_name,
        model_version=version, model_uri=f"models:/{model_name}/{version}"))


def probe_backbone(params: TrainParams, n_outputs: int, image_size: int, device: torch.device,
                   attributes: list[str] | None = None) -> tuple[ProbeNet, dict[str, str]]:
    """The frozen ProbeNet `train.init` describes, and the tags saying what was loaded."""
    from psyface import probe

    net = build_probe(params.arch, n_outputs, params.probe.layers, image_size)
    tags = initialise(net, params, attributes)
    return probe.freeze(net.to(device, memory_format=torch.channels_last)), tags


def cached_features(net: ProbeNet, images: np.ndarray, normalisation: Normalisation, settings: ProbeParams,
                    folder: Path = TRAIN_FEATURES_DIR) -> np.ndarray:
    """Every face's probe features, computed once per backbone/taps/images/flip and kept in `folder`
    (older entries are removed: one backbone's features at a time)."""
    from psyface import probe

    path = folder / f"{probe.features_key(net, images, *normalisation, settings.flip)}.npy"
    if path.is_file():
        return np.load(path)
    features = probe.extract_features(net, images, *normalisation, settings.flip, settings.batch_size)
    for old in folder.glob("*.npy"):
        old.unlink()

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, features)

    write_atomic(path, save)
    return features


def run_probe(params: TrainParams, registry: RegistryParams, all_params: dict[str, Any]) -> None:
    """The stage in `mode: probe`: cached backbone features -> ridge heads (penalty by grouped CV on
    the train split) -> the same MLflow run, registered pyfunc and run.json as fine-tuning. No epochs,
    so no checkpoints: an interrupted run restarts, reusing the cached features."""
    import mlflow

    from psyface import probe, run_safety, tracking

    if params.per_attribute:
        raise PsyfaceError("train.mode probe fits one ridge per attribute already: set train.per_attribute: false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = load_prepared(PREPARED_DIR)
    images, table = prepared.images, prepared.table
    dataset = load_dataset(DATA_DIR)
    attributes = dataset.attribute_names
    data, mean, std = split_data(images, table, attributes)
    groups = face_groups(table, dataset.identity_column)
    uri = tracking.use_tracking()
    run_safety.initialise_store(uri)
    experiment = tracking.ensure_experiment(params.experiment)
    with mlflow.start_run(log_system_metrics=True) as run:
        mlflow.set_tags({**run_safety.owner_tags(), "recipe": "probe"})
        _log_run_inputs(params, all_params, table, dataset.name, device)
        net, init_tags = probe_backbone(params, len(attributes), int(images.shape[1]), device, attributes)
        mlflow.set_tags(init_tags)
        normalisation = normalisation_of(init_tags)
        features = cached_features(net, np.asarray(images), normalisation, params.probe)
        rows = {split: (table["split"] == split).to_numpy() for split in ("train", "val")}
        heads = probe.fit_heads(features[rows["train"]], data["train"].targets, groups[rows["train"]],
                                params.probe.alphas, params.probe.folds)
        probe.set_head(net, heads)
        fitted = heads.predict(features[rows["train"]])
        predicted = heads.predict(features[rows["val"]])
        r = pearson_per_column(predicted, data["val"].targets)
        mlflow.set_tags({f"probe.alpha.{a}": repr(float(alpha)) for a, alpha in zip(attributes, heads.alphas)})
        record = {"epoch": 1, "train_loss": float(((fitted - data["train"].targets) ** 2).mean()),
                  "val_loss": float(((predicted - data["val"].targets) ** 2).mean()), "val_mean_r": float(r.mean()),
                  **{f"val_r_{a}": float(v) for a, v in zip(attributes, r)}}
        mlflow.log_metrics({**{k: v for k, v in record.items() if k != "epoch"}, "best_val_mean_r": record["val_mean_r"]})
        HISTORY_FILE.parent.mkdir(parents=True, exist_ok=True)
        history = pd.DataFrame([record])
        history.to_csv(HISTORY_FILE, index=False, float_format="%.6f")
        mlflow.log_artifact(str(HISTORY_FILE), "train")
        tqdm.write(f"probe: val r {record['val_mean_r']:.3f} | penalties "
                   + ", ".join(f"{a} {alpha:g}" for a, alpha in zip(attributes, heads.alphas)))
        cross_validate(params, np.asarray(images), table, attributes, groups, device, features)
        spec = ModelSpec(arch=params.arch, head="gap", attributes=attributes, image_size=int(images.shape[1]),
                         target_mean=mean, target_std=std, scales={a: list(dataset.attributes[a].scale) for a in attributes},
                         input_mean=list(normalisation[0]), input_std=list(normalisation[1]), taps=list(params.probe.layers),
                         probe=True, flip_average=params.probe.flip)
        version = _register(net, spec, registry, data["val"].images[0], table, run.info.run_id)
    _write_run(uri, experiment.experiment_id, run.info.run_id, registry.name, str(version.version))


def cross_validate(params: TrainParams, images: np.ndarray, table: pd.DataFrame, attributes: list[str],
                   groups: np.ndarray, device: torch.device, features: np.ndarray | None = None) -> None:
    """`split.folds`: each fold's recipe is fitted on the other folds and tested on it, as a nested
    MLflow run; per-fold r and mean ± SD go to the parent run and to `CV_FILE`. Fine-tuning stops
    early on the next fold (k+1 mod K), so it trains on K-2 folds; the probe fits on K-1.
    The registered model is not one of these: it is trained on the configured split."""
    import mlflow

    from psyface import probe, resampling

    if "fold" not in table:
        write_json_atomic({"folds": 0}, CV_FILE)
        return
    if params.per_attribute:
        raise PsyfaceError("split.folds with train.per_attribute is not supported: use the multi-task network")
    fold = table["fold"].to_numpy()
    k = int(fold.max()) + 1
    ratings = table[attributes].to_numpy(np.float64)
    per_fold: list[dict[str, float]] = []
    for index in tqdm(range(k), desc="cross-validation", unit="fold"):
        test = fold == index
        if params.mode == "probe":
            heads = probe.fit_heads(features[~test], ratings[~test], groups[~test], params.probe.alphas, params.probe.folds)
            predicted = heads.predict(features[test])
        else:
            val = fold == (index + 1) % k
            roles = np.where(test, "test", np.where(val, "val", "train"))  # this fold's split: fit / stop early / test
            data, _, _ = standardised_splits(images, ratings, roles, what=f"cross-validation fold {index}")
            net = build_model(params.arch, params.head, len(attributes), params.last_conv_stride)
            normalisation = normalisation_of(initialise(net, params, attributes))
            freeze_blocks(net, params.freeze)
            net = net.to(device, memory_format=torch.channels_last)
            state = train_epochs(net, data["train"], data["val"], params, TrainState(), device, label=f"fold {index} ",
                                 normalisation=normalisation)
            net.load_state_dict(state.best_model)
            predicted = predict_standardised(net, images[test], params.batch_size * 2, device,
                                             uses_bf16(params.precision, device), *normalisation)
        r = pearson_per_column(predicted, ratings[test])
        per_fold.append(dict(zip(attributes, map(float, r))))
        with mlflow.start_run(run_name=f"fold-{index}", nested=True):
            mlflow.set_tags({"fold": str(index), "recipe": params.mode})
            mlflow.log_metrics({"test_mean_r": float(r.mean()), "test_faces": int(test.sum()),
                                **{f"test_r_{a}": float(v) for a, v in zip(attributes, r)}})
    summary = resampling.fold_summary(per_fold, attributes)
    mlflow.log_metrics({f"cv_{name}_{key}": value for name, values in summary.items() for key, value in values.items()})
    write_json_atomic({"folds": k, "recipe": params.mode, "summary": summary, "per_fold": per_fold}, CV_FILE)
    tqdm.write(f"cross-validation ({k} folds): mean r {summary['mean']['pearson_r_mean']:.3f} "
               f"± {summary['mean']['pearson_r_sd']:.3f}")


def _run_tags() -> dict[str, str]:
    import mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(mlflow.active_run().info.run_id).data.tags


def _after_epoch(state: TrainState, path: Path, attributes: list[str]) -> None:
    """Checkpoint, then log: a kill between the two leaves an epoch the resumed run logs once
    (`_log_unlogged_epochs`); the other order logged the epoch again after the resume."""
    import mlflow

    save_checkpoint(state, path)
    mlflow.log_metrics(_epoch_metrics(state.history[-1], attributes), step=state.epoch)


def _epoch_metrics(record: dict[str, float], attributes: list[str]) -> dict[str, float]:
    """A history record as MLflow metrics: `val_r_<column>` named by its attribute."""
    metrics = {key: value for key, value in record.items() if not key.startswith("val_r_") and key != "epoch"}
    metrics.update({f"val_r_{attributes[int(key[6:])]}": value for key, value in record.items() if key.startswith("val_r_")})
    return metrics


def _log_unlogged_epochs(state: TrainState, attributes: list[str]) -> None:
    """Log the checkpointed epochs the active run lacks (killed after the checkpoint, before the log)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logged = {m.step for m in MlflowClient().get_metric_history(mlflow.active_run().info.run_id, "val_mean_r")}
    for record in state.history:
        if int(record["epoch"]) not in logged:
            mlflow.log_metrics(_epoch_metrics(record, attributes), step=int(record["epoch"]))


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def _child_run(parent_id: str, attribute: str) -> str | None:
    """The nested run of `attribute` under `parent_id` from an interrupted attempt, to continue it."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.attribute = '{attribute}'",
                              output_format="list")
    return runs[0].info.run_id if runs else None


def _write_history(networks: list, attributes: list[str], per_attribute: bool) -> pd.DataFrame:
    """Per-epoch curves as a CSV (a `dvc plots` source): attribute names instead of column indices."""
    frames = []
    for index, (_, state, _) in enumerate(networks):
        frame = pd.DataFrame(state.history)
        names = [attributes[index]] if per_attribute else attributes
        frame = frame.rename(columns={f"val_r_{i}": f"val_r_{name}" for i, name in enumerate(names)})
        frames.append(frame.set_index("epoch") if not per_attribute else frame.set_index("epoch").add_suffix(f"@{names[0]}"))
    history = pd.concat(frames, axis=1).reset_index() if per_attribute else frames[0].reset_index()
    if per_attribute:
        for name in attributes:
            history[f"val_r_{name}"] = history[f"val_r_{name}@{name}"]
        for metric in ("train_loss", "val_loss"):
            history[metric] = history[[f"{metric}@{a}" for a in attributes]].mean(axis=1)
        history["val_mean_r"] = history[[f"val_r_{a}" for a in attributes]].mean(axis=1)
        history = history[["epoch", "train_loss", "val_loss", "val_mean_r", *[f"val_r_{a}" for a in attributes]]]
    HISTORY_FILE.parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(HISTORY_FILE, index=False, float_format="%.6f")
    return history


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so a killed stage ends its MLflow run FAILED instead of leaving it RUNNING


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface train", description=__doc__.split("\n\n")[0]).parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    params = load_section("train", TrainParams)
    registry = load_section("registry", RegistryParams)
    if params.distributed.nproc_per_node > 1 and not is_worker():
        return launch(params.distributed.nproc_per_node, "psyface.train", list(argv or []))
    with session(params.distributed) as context:
        try:
            run_training(params, registry, read_yaml(PARAMS_FILE) if PARAMS_FILE.exists() else {}, context)
        except PsyfaceError as error:
            if context.is_main:
                raise
            raise PsyfaceError(f"rank {context.rank}: {error}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage `train`: fit the network on the prepared array, track it in MLflow, register a candidate.

The core (`augment`, `train_epochs`) takes tensors and returns a `TrainState`; the stage around it
reads `artifacts/prepared/`, checkpoints every epoch (an interrupted run resumes bit-identically),
logs to MLflow and registers the model with alias `candidate`. Multi-task by default: one network,
every attribute, standardised targets (train mean/std travel in the ModelSpec). `per_attribute: true`
trains one network per attribute (the peer's protocol) as nested runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from psyface.config import PARAMS_FILE, load_section, read_yaml
from psyface.dataset.layout import DATA_DIR, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_atomic, write_json_atomic
from psyface.prepare import PREPARED_DIR, load_prepared
from psyface.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeEnsemble,
    AttributeNet,
    Head,
    ModelSpec,
    ProbeNet,
    build_model,
    build_probe,
    freeze_blocks,
    imagenet_weights_file,
    load_matching,
    normalise,
    read_state_dict,
    to_input,
    to_unit,
    weights_normalisation,
)
from psyface.probe import ProbeParams
from psyface.resampling import face_groups

TRAIN_DIR = Path("artifacts/train")
CHECKPOINT_DIR = TRAIN_DIR / "checkpoints"
HISTORY_FILE = TRAIN_DIR / "history.csv"
FEATURES_DIR = TRAIN_DIR / "features"  # the probe's cached backbone features (persistent DVC output)
CV_FILE = TRAIN_DIR / "cv.json"  # per-fold test r when split.folds is set; {"folds": 0} otherwise
Normalisation = tuple[Sequence[float], Sequence[float]]
IMAGENET: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class Augmentation:
    """Random per-image transforms applied to whole batches on the training device."""

    flip: bool = True
    rotation_deg: float = 8.0
    translate: float = 0.06  # fraction of the image side
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.1


@dataclass
class TrainParams:
    mode: Literal["finetune", "probe"] = "finetune"  # probe: frozen backbone + ridge heads (psyface.probe)
    arch: str = "vgg16"
    head: Head = "gap"
    last_conv_stride: int = 16  # VGG only: 8 or 4 keep the last blocks' resolution (a finer Grad-CAM grid)
    init: str = "scratch"  # scratch | imagenet | PATH.pth/.safetensors | models:/NAME@ALIAS
    freeze: int = 0  # VGG convolution blocks (counted from the input) kept as initialised; 0: none
    per_attribute: bool = False
    epochs: int = 12
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 4
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware has it natively
    compile: bool = False  # torch.compile, CUDA only
    experiment: str = "psyface"
    augmentation: Augmentation = field(default_factory=Augmentation)
    probe: ProbeParams = field(default_factory=ProbeParams)


@dataclass
class RegistryParams:
    name: str = "psyface-vgg16"


@dataclass
class Data:
    """Uint8 images (N, H, W, 3) and standardised float32 targets (N, n_attributes)."""

    images: np.ndarray
    targets: np.ndarray


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped (saved every epoch)."""

    epoch: int = 0
    best_r: float = -math.inf
    best_epoch: int = 0
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    run_id: str = ""
    fingerprint: str = ""
    finished: bool = False


@dataclass(frozen=True)
class Objective:
    """What the loop minimises (`loss` on output and target tensors) and what early stopping
    maximises (`score`: one number per output column, arrays in; history calls it `val_mean_r`)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------- pure core: tensors in, state out


def augment(batch: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Flip, rotate/translate and colour-jitter a [0, 1] (N, 3, H, W) batch, each image its own draw."""
    n = batch.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    angle = uniform(math.radians(settings.rotation_deg))
    shift = torch.stack([uniform(settings.translate * 2), uniform(settings.translate * 2)], dim=1)
    flip = torch.rand(n, generator=generator) < 0.5 if settings.flip else torch.zeros(n, dtype=torch.bool)
    sign = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * sign, -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * sign, torch.cos(angle)
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    factors = [1 + uniform(s).to(batch.device).view(n, 1, 1, 1) for s in
               (settings.brightness, settings.contrast, settings.saturation)]
    batch = batch * factors[0]
    grey = (batch * torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    batch = (batch - grey.mean((2, 3), keepdim=True)) * factors[1] + grey.mean((2, 3), keepdim=True)
    batch = (batch - grey) * factors[2] + grey
    return batch.clamp_(0, 1)


def pearson_per_column(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson r of each column (0 where either side is constant)."""
    p = predicted - predicted.mean(0)
    a = actual - actual.mean(0)
    denominator = np.sqrt((p**2).sum(0) * (a**2).sum(0))
    return np.divide((p * a).sum(0), denominator, out=np.zeros(p.shape[1]), where=denominator > 0)


REGRESSION = Objective(loss=F.mse_loss, score=pearson_per_column)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, exactly over the epoch budget."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast. `auto` picks it where bf16 is native (CUDA, CPUs
    with AVX-512 BF16 or AMX: about 2x faster than fp32 there) and stays fp32 where it would be
    emulated and slower."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def predict_standardised(net: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
                         autocast: bool, normalisation: Normalisation = IMAGENET) -> np.ndarray:
    net.eval()
    outputs = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(images), batch_size):
            outputs.append(net(to_input(images[start : start + batch_size], device, *normalisation)).float().cpu().numpy())
    return np.concatenate(outputs)


def train_epochs(
    net: torch.nn.Module,
    train: Data,
    val: Data,
    params: TrainParams,
    state: TrainState,
    device: torch.device,
    on_epoch: Callable[[TrainState], None] = lambda state: None,
    label: str = "",
    objective: Objective = REGRESSION,
    normalisation: Normalisation = IMAGENET,
) -> TrainState:
    """Train from `state` (fresh or restored) until the epoch budget or early stopping; calls
    `on_epoch(state)` after each epoch with a state that resumes bit-identically."""
    autocast = uses_bf16(params.precision, device)
    model = torch.compile(net) if params.compile and device.type == "cuda" else net
    steps = math.ceil(len(train.images) / params.batch_size)
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]  # frozen ones stay put
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    total, warmup = params.epochs * steps, max(1, round(params.warmup_epochs * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    generator = torch.Generator()
    if state.model:
        net.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng["torch"])
        generator.set_state(state.rng["generator"])
    else:
        torch.manual_seed(params.seed)
        generator.manual_seed(params.seed)
    targets = torch.as_tensor(train.targets)
    while state.epoch < params.epochs and state.stale < params.patience:
        model.train()
        order = torch.randperm(len(train.images), generator=generator)
        losses = []
        bar = tqdm(range(steps), desc=f"{label}epoch {state.epoch + 1}/{params.epochs}", unit="batch", leave=False)
        for step in bar:
            index = order[step * params.batch_size : (step + 1) * params.batch_size]
            batch = normalise(augment(to_unit(train.images[index.numpy()], device), params.augmentation, generator),
                              *normalisation)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = objective.loss(model(batch).float(), targets[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        predicted = predict_standardised(model, val.images, params.batch_size * 2, device, autocast, normalisation)
        r = objective.score(predicted, val.targets)
        state.epoch += 1
        val_loss = objective.loss(torch.as_tensor(predicted), torch.as_tensor(val.targets)).item()
        record = {"epoch": state.epoch, "train_loss": float(np.mean(losses)),
                  "val_loss": float(val_loss), "val_mean_r": float(r.mean()),
                  "lr": scheduler.get_last_lr()[0], **{f"val_r_{i}": float(v) for i, v in enumerate(r)}}
        state.history.append(record)
        if record["val_mean_r"] > state.best_r:
            state.best_r, state.best_epoch, state.stale = record["val_mean_r"], state.epoch, 0
            state.best_model = copy.deepcopy(net.state_dict())
        else:
            state.stale += 1
        state.model, state.optimizer, state.scheduler = net.state_dict(), optimizer.state_dict(), scheduler.state_dict()
        state.rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        bar.close()
        tqdm.write(f"{label}epoch {state.epoch}: loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}"
                   f"  val r {record['val_mean_r']:.3f}")
        on_epoch(state)
    return state


# ---------------------------------------------------------------- stage edges: files, checkpoints


def split_data(images: np.ndarray, table: pd.DataFrame, attributes: list[str]) -> tuple[dict[str, Data], list[float], list[float]]:
    """Per split: images and targets standardised with the train split's mean and std."""
    ratings = table[attributes].to_numpy(np.float64)
    train_rows = (table["split"] == "train").to_numpy()
    mean, std = ratings[train_rows].mean(0), ratings[train_rows].std(0)
    std[std == 0] = 1.0
    data = {}
    for split in ("train", "val", "test"):
        rows = (table["split"] == split).to_numpy()
        if not rows.any():
            raise PsyfaceError(f"the prepared table has no {split!r} rows")
        data[split] = Data(images[rows], ((ratings[rows] - mean) / std).astype(np.float32))
    return data, mean.tolist(), std.tolist()


def fingerprint(params: TrainParams, folder: Path = PREPARED_DIR) -> str:
    """Hash of the training params and the prepared data: a checkpoint resumes only the same training."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode())
    for name in ("images.npy", "table.csv", "meta.json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def save_checkpoint(state: TrainState, path: Path) -> None:
    """Atomic `torch.save` of plain state dicts (loadable with weights_only=True)."""
    write_atomic(path, lambda tmp: torch.save(dataclasses.asdict(state), tmp))


def load_checkpoint(path: Path, expected_fingerprint: str) -> TrainState | None:
    """The unfinished state of the same training, or None (fresh start)."""
    if not path.is_file():
        return None
    state = TrainState(**torch.load(path, map_location="cpu", weights_only=True))
    if state.fingerprint != expected_fingerprint or state.finished:
        return None
    return state


def initialise(net: AttributeNet, params: TrainParams, attributes: list[str] | None = None) -> dict[str, str]:
    """Apply `params.init` to a freshly built network; returns tags describing what was loaded.

    From the registry the lineage tags name the exact version an alias pointed to; the source's last
    layer is loaded only when it predicted the same `attributes` (a base task's head never is)."""
    if params.init == "scratch":
        return {"init": "scratch"}
    lineage: dict[str, str] = {}
    if params.init.startswith("models:/"):
        from psyface.tracking import load_model, resolve_version

        version = resolve_version(params.init)
        source, source_spec = load_model(f"models:/{version.name}/{version.version}")
        if not isinstance(source, AttributeNet):
            raise PsyfaceError(f"init {params.init!r} is a per-attribute ensemble; initialise from a multi-task model")
        state = source.state_dict()
        if attributes is None or source_spec.attributes != attributes:
            state = {k: v for k, v in state.items() if not k.startswith("last_layer.")}
        lineage = {"init.model_name": version.name, "init.model_version": str(version.version),
                   "init.run_id": str(version.run_id)}
        mean, std = source_spec.input_mean, source_spec.input_std
    elif params.init == "imagenet":
        state = read_state_dict(imagenet_weights_file(params.arch))
        mean, std = weights_normalisation(params.arch)
    elif params.init.endswith((".pth", ".pt", ".safetensors")):
        state = read_state_dict(Path(params.init))
        mean, std = weights_normalisation(params.arch)
    else:
        raise PsyfaceError(f"train.init {params.init!r}: expected scratch, imagenet, a .pth/.safetensors file or models:/NAME@ALIAS")
    loaded, skipped = load_matching(net, state, params.arch)
    return {"init": params.init, "init.loaded_tensors": str(loaded), "init.skipped_tensors": str(skipped),
            "init.mean": json.dumps(list(mean)), "init.std": json.dumps(list(std)), **lineage}


def normalisation_of(init_tags: dict[str, str]) -> Normalisation:
    """The input normalisation `initialise` recorded (ImageNet's from scratch)."""
    if "init.mean" not in init_tags:
        return IMAGENET
    return json.loads(init_tags["init.mean"]), json.loads(init_tags["init.std"])


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


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def run_training(params: TrainParams, registry: RegistryParams, all_params: dict[str, Any]) -> None:
    """The stage: data -> (resumable) training -> MLflow run + registered candidate -> run.json."""
    import mlflow

    from psyface import run_safety, tracking

    FEATURES_DIR.mkdir(parents=True, exist_ok=True)  # a DVC output in both modes (empty when fine-tuning)
    if params.mode == "probe":
        run_probe(params, registry, all_params)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    outputs, networks = (1, len(attributes)) if params.per_attribute else (len(attributes), 1)
    run_safety.check_store(tracking.tracking_uri(), tracking.store_dir(),
                           run_safety.training_bytes(params.arch, params.head, outputs, networks,
                                                    params.last_conv_stride))
    print_ = fingerprint(params)
    tasks = [(a, [i]) for i, a in enumerate(attributes)] if params.per_attribute else [("", list(range(len(attributes))))]
    checkpoints = {task: CHECKPOINT_DIR / (f"last-{task}.pt" if task else "last.pt") for task, _ in tasks}
    states = {task: load_checkpoint(path, print_) for task, path in checkpoints.items()}
    uri = tracking.use_tracking()
    run_safety.initialise_store(uri)
    experiment = tracking.ensure_experiment(params.experiment)
    resume_id = next((s.run_id for s in states.values() if s and s.run_id), None)
    if resume_id and not _run_exists(resume_id):
        resume_id, states = None, dict.fromkeys(states)
    for stale in run_safety.close_stale_runs(experiment.experiment_id, keep=resume_id):
        print(f"marked run {stale} KILLED: its training process is gone")
    with mlflow.start_run(run_id=resume_id, log_system_metrics=True) as run:
        mlflow.set_tags(run_safety.owner_tags())
        if resume_id:
            print(f"resuming run {resume_id} from its checkpoint")
            mlflow.set_tag("resumed_from_epoch", str(min((s.epoch for s in states.values() if s), default=0)))
        else:
            _log_run_inputs(params, all_params, table, dataset.name, device)
        networks = []
        for task, columns in tasks:
            torch.manual_seed(params.seed)
            net = build_model(params.arch, params.head, len(columns), params.last_conv_stride).to(
                device, memory_format=torch.channels_last)
            state = states[task] or TrainState(run_id=run.info.run_id, fingerprint=print_)
            names = [attributes[c] for c in columns]
            train = Data(data["train"].images, data["train"].targets[:, columns])
            val = Data(data["val"].images, data["val"].targets[:, columns])
            child = mlflow.start_run(run_name=task, nested=True, run_id=_child_run(run.info.run_id, task)) if task else nullcontext()
            with child:
                if task:
                    mlflow.set_tag("attribute", task)
                if not state.model:
                    mlflow.set_tags(initialise(net, params, names))
                # read back, so a resumed run keeps the normalisation its weights came with
                spec.input_mean, spec.input_std = map(list, normalisation_of(_run_tags()))
                mlflow.set_tag("freeze_blocks", str(params.freeze))
                freeze_blocks(net, params.freeze)
                state = train_epochs(net, train, val, params, state, device,
                                     on_epoch=lambda s, p=checkpoints[task], n=names: _after_epoch(s, p, n),
                                     label=f"{task} " if task else "", normalisation=(spec.input_mean, spec.input_std))
                mlflow.log_metrics({"best_val_mean_r": state.best_r, "best_epoch": state.best_epoch})
            net.load_state_dict(state.best_model)
            networks.append((net, state, checkpoints[task]))
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
    mlflow.set_tags({**tracking.git_tags(), "data_hash": tracking.data_hash(), "dataset": dataset,
                     "split_hash": split_hash(table), "device": device.type,
                     "autocast": "bf16" if uses_bf16(params.precision, device) else "fp32"})
    with warnings.catch_warnings():  # MLflow registers two equivalent local-file source types
        warnings.simplefilter("ignore", UserWarning)
        source = mlflow.data.from_pandas(table, source=str(PREPARED_DIR.resolve()), name=dataset)
    mlflow.log_input(source, context="training")


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
                    folder: Path = FEATURES_DIR) -> np.ndarray:
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
            fit = ~test & ~val
            mean, std = ratings[fit].mean(0), ratings[fit].std(0)
            std[std == 0] = 1.0
            net = build_model(params.arch, params.head, len(attributes), params.last_conv_stride)
            normalisation = normalisation_of(initialise(net, params, attributes))
            freeze_blocks(net, params.freeze)
            net = net.to(device, memory_format=torch.channels_last)
            state = train_epochs(net, Data(images[fit], ((ratings[fit] - mean) / std).astype(np.float32)),
                                 Data(images[val], ((ratings[val] - mean) / std).astype(np.float32)), params,
                                 TrainState(), device, label=f"fold {index} ", normalisation=normalisation)
            net.load_state_dict(state.best_model)
            predicted = predict_standardised(net, images[test], params.batch_size * 2, device,
                                             uses_bf16(params.precision, device), normalisation)
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


def split_hash(table: pd.DataFrame) -> str:
    """Which ids are in which split: promotion compares only models evaluated on the same split."""
    pairs = table[["id", "split"]].astype(str).agg(":".join, axis=1)
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]


def _after_epoch(state: TrainState, path: Path, attributes: list[str]) -> None:
    import mlflow

    record = state.history[-1]
    metrics = {key: value for key, value in record.items() if not key.startswith("val_r_") and key != "epoch"}
    metrics.update({f"val_r_{attributes[int(key[6:])]}": value for key, value in record.items() if key.startswith("val_r_")})
    mlflow.log_metrics(metrics, step=state.epoch)
    save_checkpoint(state, path)


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
    run_training(params, registry, read_yaml(PARAMS_FILE) if PARAMS_FILE.exists() else {})
    return 0


if __name__ == "__main__":
    main()

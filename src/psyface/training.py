"""The training core, pure: tensors in, `TrainState` out. The recipe (`TrainParams`), the loop with its
augmentation, LR schedule and early stopping, per-split standardisation, initialisation from files
or the registry, and resumable checkpoints. The train stage (`train.py`), the transfer experiment and
the benchmarks all train through it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from psyface.artifacts import (
    PREPARED_DIR,
)
from psyface.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from psyface.distributed import (
    Context,
    DistributedParams,
    from_main,
    gather,
    gather_rows,
    loss_weight,
    share,
    sum_over_ranks,
    wrap,
)
from psyface.errors import PsyfaceError
from psyface.io import write_atomic
from psyface.metrics import pearson_columns
from psyface.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeNet,
    Head,
    imagenet_weights_file,
    load_matching,
    normalise,
    predict_standardised,
    read_state_dict,
    to_unit,
    weights_normalisation,
)
from psyface.probe import ProbeParams

Normalisation = tuple[Sequence[float], Sequence[float]]


IMAGENET: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class Augmentation:
    """Random per-image transforms applied to whole batches on the training device."""

    flip: bool = True
    rotation_deg: NonNegativeFloat = 4.0
    translate: NonNegativeFloat = 0.03  # fraction of the image side
    brightness: NonNegativeFloat = 0.0
    contrast: NonNegativeFloat = 0.0
    saturation: NonNegativeFloat = 0.0


@dataclass
class TrainParams:
    mode: Literal["finetune", "probe"] = "finetune"  # probe: frozen backbone + ridge heads (psyface.probe)
    arch: str = "vgg16_bn"
    head: Head = "gap"
    last_conv_stride: Literal[4, 8, 16] = 8  # VGG only: 16 as published; 8 or 4 keep the last blocks' resolution
    init: str = "scratch"  # scratch | imagenet | PATH.pth/.safetensors | models:/NAME@ALIAS
    freeze: NonNegativeInt = 0  # VGG convolution blocks (counted from the input) kept as initialised; 0: none
    per_attribute: bool = False
    epochs: PositiveInt = 14
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    warmup_epochs: NonNegativeFloat = 0.5
    patience: PositiveInt = 4
    seed: NonNegativeInt = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware has it natively
    compile: bool = False  # torch.compile, CUDA only
    experiment: str = "psyface"
    augmentation: Augmentation = field(default_factory=Augmentation)
    probe: ProbeParams = field(default_factory=ProbeParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)


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


def augment(batch: torch.Tensor, settings: Augmentation, generator: torch.Generator,
            rows: slice = slice(None), draws: int | None = None) -> torch.Tensor:
    """Flip, rotate/translate and colour-jitter a [0, 1] (N, 3, H, W) batch, each image its own draw.

    Under DDP `batch` is a rank's `rows` of a `draws`-image global batch: the draws are made for the
    whole global batch (every rank consumes the generator alike) and this share's are used."""
    n = batch.shape[0]
    total = draws or n

    def uniform(scale: float) -> torch.Tensor:
        return ((torch.rand(total, generator=generator) * 2 - 1) * scale)[rows]

    angle = uniform(math.radians(settings.rotation_deg))
    shift = torch.stack([uniform(settings.translate * 2), uniform(settings.translate * 2)], dim=1)
    flip = (torch.rand(total, generator=generator) < 0.5)[rows] if settings.flip else torch.zeros(n, dtype=torch.bool)
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
    """Pearson r of each column, 0 where undefined (a constant prediction has learned nothing), so
    the mean over attributes that early stopping maximises stays defined."""
    return np.nan_to_num(pearson_columns(predicted, actual), nan=0.0)


REGRESSION = Objective(loss=F.mse_loss, score=pearson_per_column)


def lr_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over `warmup` steps, then cosine decay to zero exactly at the last of `total`
    steps (the epoch budget), from torch's own schedulers."""
    schedulers = torch.optim.lr_scheduler
    warm = schedulers.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    decay = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    return schedulers.SequentialLR(optimizer, [warm, decay], milestones=[warmup])


@functools.cache
def cpuinfo_field(name: str) -> str:
    """One field of Linux's /proc/cpuinfo for the first CPU (`vendor_id`, `model name`), or "" where
    there is none: torch exposes the instruction sets but neither the vendor nor the model."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def cpu_vendor() -> str:
    """`AuthenticAMD`, `GenuineIntel`, or "" off Linux: whose implementation of bf16 the CPU runs."""
    return cpuinfo_field("vendor_id")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast. `auto` picks it where it measured faster than fp32
    (benchmarks/bench_train.py, VGG16-BN train step at 64 px): CUDA; CPUs with AMX tiles (about 2x);
    AMD CPUs with AVX-512 BF16 (an AMD EPYC, Zen 5: 1.84x). AVX-512 BF16 alone on Intel is not enough:
    on such a Xeon (no AMX) the step ran at 0.67x fp32's speed, so it and every other CPU stay fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return torch.cpu._is_amx_tile_supported() or (
        torch.cpu._is_avx512_bf16_supported() and cpu_vendor() == "AuthenticAMD")


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
    context: Context = Context(),
) -> TrainState:
    """Train from `state` (fresh or restored) until the epoch budget or early stopping; calls
    `on_epoch(state)` after each epoch with a state that resumes bit-identically.

    Under DDP (`context.enabled`) every rank calls this with the same data and state: each trains on
    its share of every global batch and predicts its share of the validation images; rank 0 scores
    the gathered predictions and its early-stopping decision is broadcast. `objective.loss` must be
    a mean over rows (the share weighting relies on it). Dropout draws from each rank's own stream."""
    autocast = uses_bf16(params.precision, device)
    steps = math.ceil(len(train.images) / params.batch_size)
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]  # frozen ones stay put
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    total, warmup = params.epochs * steps, max(1, round(params.warmup_epochs * steps))
    scheduler = lr_scheduler(optimizer, total, warmup)
    generator = torch.Generator()
    own_rng = "torch" if context.is_main else f"torch.{context.rank}"
    if state.model:
        net.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng.get(own_rng, state.rng["torch"]))
        generator.set_state(state.rng["generator"])
    else:
        torch.manual_seed(params.seed + context.rank)
        generator.manual_seed(params.seed)
    forward = torch.compile(net) if params.compile and device.type == "cuda" else net
    model = wrap(forward, context)  # validation runs on `forward`: its shares differ in size, no collectives
    targets = torch.as_tensor(train.targets)
    val_rows = share(len(val.images), context)
    while state.epoch < params.epochs and state.stale < params.patience:
        model.train()
        order = torch.randperm(len(train.images), generator=generator)
        losses = []
        bar = tqdm(range(steps), desc=f"{label}epoch {state.epoch + 1}/{params.epochs}", unit="batch", leave=False,
                   disable=not context.is_main)
        for step in bar:
            index = order[step * params.batch_size : (step + 1) * params.batch_size]
            rows = share(len(index), context)
            mine = index[rows]
            batch = normalise(augment(to_unit(train.images[mine.numpy()], device), params.augmentation, generator,
                                      rows, len(index)), *normalisation)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                output = model(batch).float()
            if len(mine):
                loss = objective.loss(output, targets[mine].to(device)) * loss_weight(len(mine), len(index), context)
            else:  # an empty share of a short last batch still joins the gradient all-reduce
                loss = output.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        losses = [value / context.world_size for value in sum_over_ranks(losses, context)]  # global batch means
        local = val.images[val_rows]
        predicted = gather_rows(predict_standardised(forward, local, params.batch_size * 2, device, autocast, *normalisation),
                                context)
        state.epoch += 1
        if context.is_main:
            r = objective.score(predicted, val.targets)
            val_loss = objective.loss(torch.as_tensor(predicted), torch.as_tensor(val.targets)).item()
            record = {"epoch": state.epoch, "train_loss": float(np.mean(losses)),
                      "val_loss": float(val_loss), "val_mean_r": float(r.mean()),
                      "lr": scheduler.get_last_lr()[0], **{f"val_r_{i}": float(v) for i, v in enumerate(r)}}
            improved = record["val_mean_r"] > state.best_r
        record, improved = from_main((record, improved) if context.is_main else None, context)
        state.history.append(record)
        if improved:
            state.best_r, state.best_epoch, state.stale = record["val_mean_r"], state.epoch, 0
            state.best_model = copy.deepcopy(net.state_dict())
        else:
            state.stale += 1
        state.model, state.optimizer, state.scheduler = net.state_dict(), optimizer.state_dict(), scheduler.state_dict()
        rng_states = gather(torch.get_rng_state(), context)
        state.rng = {"torch": rng_states[0], "generator": generator.get_state(),
                     **{f"torch.{rank}": rng for rank, rng in enumerate(rng_states) if rank}}
        bar.close()
        if context.is_main:
            tqdm.write(f"{label}epoch {state.epoch}: loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}"
                       f"  val r {record['val_mean_r']:.3f}")
        on_epoch(state)
    return state


def standardised_splits(images: np.ndarray, values: np.ndarray, splits: np.ndarray, standardise: bool = True,
                        what: str = "the prepared table") -> tuple[dict[str, Data], list[float], list[float]]:
    """Per split, the rows whose (N, K) `values` are all known, as float32 targets standardised with
    the train split's mean and SD (a constant column keeps SD 1; `standardise=False`: as they are,
    e.g. class indices)."""
    known = ~np.isnan(values).any(axis=1)
    scaler = StandardScaler(with_mean=standardise, with_std=standardise).fit(values[known & (splits == "train")])
    mean = scaler.mean_ if standardise else np.zeros(values.shape[1])
    std = scaler.scale_ if standardise else np.ones(values.shape[1])
    data = {}
    for split in ("train", "val", "test"):
        rows = known & (splits == split)
        if not rows.any():
            raise PsyfaceError(f"{what} has no {split!r} rows" + ("" if known.all() else " with a value"))
        data[split] = Data(images[rows], ((values[rows] - mean) / std).astype(np.float32))
    return data, mean.tolist(), std.tolist()


def split_data(images: np.ndarray, table: pd.DataFrame, attributes: list[str]) -> tuple[dict[str, Data], list[float], list[float]]:
    """Per split: images and the attributes' ratings standardised with the train split's mean and SD."""
    return standardised_splits(images, table[attributes].to_numpy(np.float64), table["split"].to_numpy())


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


def check_init(params: TrainParams) -> None:
    """Find a missing weights file or a malformed `train.init` before any MLflow run opens (a failure
    inside the run would leave a FAILED run in the store for every attempt). A registry source is
    checked by `resolve_version` once the store is set."""
    if params.init == "scratch" or params.init.startswith("models:/"):
        return
    if params.init == "imagenet":
        imagenet_weights_file(params.arch)
    elif params.init.endswith((".pth", ".pt", ".safetensors")):
        if not Path(params.init).is_file():
            raise PsyfaceError(f"train.init weights file {params.init} not found")
    else:
        raise PsyfaceError(f"train.init {params.init!r}: expected scratch, imagenet, a .pth/.safetensors file or models:/NAME@ALIAS")


def initialise(net: AttributeNet, params: TrainParams, attributes: list[str] | None = None) -> dict[str, str]:
    """Apply `params.init` to a freshly built network; returns tags describing what was loaded.

    From the registry the lineage tags name the exact version an alias pointed to; the source's last
    layer is loaded only when it predicted the same `attributes` (a base task's head never is)."""
    check_init(params)
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
    else:
        state = read_state_dict(Path(params.init))
        mean, std = weights_normalisation(params.arch)
    loaded, skipped = load_matching(net, state, params.arch)
    return {"init": params.init, "init.loaded_tensors": str(loaded), "init.skipped_tensors": str(skipped),
            "init.mean": json.dumps(list(mean)), "init.std": json.dumps(list(std)), **lineage}


def normalisation_of(init_tags: dict[str, str]) -> Normalisation:
    """The input normalisation `initialise` recorded (ImageNet's from scratch)."""
    if "init.mean" not in init_tags:
        return IMAGENET
    return json.loads(init_tags["init.mean"]), json.loads(init_tags["init.std"])


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def split_hash(table: pd.DataFrame) -> str:
    """Which ids are in which split: promotion compares only models evaluated on the same split."""
    pairs = table[["id", "split"]].astype(str).agg(":".join, axis=1)
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]

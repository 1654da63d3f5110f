"""Training cost, side by side on the same images: the published peer's loop vs psyface's.

Peer (Xiao 2024, Psychology/main.py): PIL decode + torchvision transforms every epoch in a DataLoader
(num_workers=0), 224 px, fp32, batch 40, Adam(5e-4, wd 5e-4), CosineAnnealingLR(T_max=200), MSE,
torchvision VGG16 with the last classifier layer -> Linear(4096, 1), one network per attribute.
psyface: images decoded once to a uint8 array (`prepare`, counted here), batched tensor augmentation,
one multi-task network for every attribute (params.yaml `train`, `prepare.image_size`).

Both sides run in their own subprocess (so peak memory is each one's own) for the same epochs on the
same train/val subset. Prints total time, data-path throughput per image and peak RSS, and the ratios
(targets: total >= 20x, data path >= 2x).

    python benchmarks/bench_train.py [--images 24] [--val 8] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PEER_SIZE, PEER_BATCH = 224, 40


def subset(images: int, val: int) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray, list[str]]:
    """The first `images` train and `val` val faces of the default data, with their ratings."""
    from psyface.dataset.layout import DATA_DIR, load_dataset

    spec = load_dataset(DATA_DIR)
    table = spec.read_ratings()
    attributes = spec.attribute_names
    rows = table.iloc[: images + val]
    paths = [spec.image_path(i) for i in rows[spec.id_column]]
    ratings = rows[attributes].to_numpy(np.float32)
    return paths[:images], paths[images:], ratings[:images], ratings[images:], attributes


def peer(args: argparse.Namespace) -> dict[str, float]:
    """The peer's protocol: per attribute, a fresh VGG16 trained from a PIL/torchvision DataLoader."""
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    train_paths, val_paths, train_y, val_y, attributes = subset(args.images, args.val)
    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    augmenting = transforms.Compose([transforms.Resize((PEER_SIZE, PEER_SIZE)), transforms.RandomHorizontalFlip(),
                                     transforms.RandomRotation(10), transforms.ToTensor(), normalise])
    plain = transforms.Compose([transforms.Resize((PEER_SIZE, PEER_SIZE)), transforms.ToTensor(), normalise])

    class Faces(Dataset):
        def __init__(self, paths: list[Path], targets: np.ndarray, transform: transforms.Compose):
            self.paths, self.targets, self.transform = paths, targets, transform

        def __len__(self) -> int:
            return len(self.paths)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            image = Image.open(self.paths[index]).convert("RGB")
            return self.transform(image), torch.tensor([self.targets[index]])

    start = time.perf_counter()
    for column in range(len(attributes)):
        model = torchvision.models.vgg16(weights=None)
        model.classifier[6] = torch.nn.Linear(4096, 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        train = DataLoader(Faces(train_paths, train_y[:, column], augmenting), batch_size=PEER_BATCH, shuffle=True,
                           num_workers=0)
        val = DataLoader(Faces(val_paths, val_y[:, column], plain), batch_size=PEER_BATCH, num_workers=0)
        for _ in range(args.epochs):
            model.train()
            for images, targets in train:
                loss = torch.nn.functional.mse_loss(model(images), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
            model.eval()
            with torch.no_grad():
                for images, _ in val:
                    model(images)
    total = time.perf_counter() - start
    loader = DataLoader(Faces(train_paths * args.data_repeats, train_y[:, 0].repeat(args.data_repeats), augmenting),
                        batch_size=PEER_BATCH, num_workers=0)
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in loader)
    return {"total_s": total, "data_img_per_s": seen / (time.perf_counter() - start)}


def psyface_side(args: argparse.Namespace) -> dict[str, float]:
    """psyface: decode once (prepare), then one multi-task network from the array (train params)."""
    from psyface.config import load_section
    from psyface.images import load_image
    from psyface.model import build_model, normalise, to_unit
    from psyface.prepare import PrepareParams
    from psyface.train import Data, TrainParams, TrainState, augment, train_epochs

    train_paths, val_paths, train_y, val_y, attributes = subset(args.images, args.val)
    params = load_section("train", TrainParams)
    size = load_section("prepare", PrepareParams).image_size
    params.epochs, params.patience = args.epochs, args.epochs + 1
    mean, std = train_y.mean(0), train_y.std(0) + 1e-6
    start = time.perf_counter()
    train_images = np.stack([load_image(p, size) for p in train_paths])
    val_images = np.stack([load_image(p, size) for p in val_paths])
    torch.manual_seed(params.seed)
    net = build_model(params.arch, params.head, len(attributes)).to(memory_format=torch.channels_last)
    train_epochs(net, Data(train_images, (train_y - mean) / std), Data(val_images, (val_y - mean) / std), params,
                 TrainState(), torch.device("cpu"))
    total = time.perf_counter() - start
    repeated = np.concatenate([train_images] * args.data_repeats)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, len(repeated), params.batch_size):
        normalise(augment(to_unit(repeated[first : first + params.batch_size]), params.augmentation, generator))
    return {"total_s": total, "data_img_per_s": len(repeated) / (time.perf_counter() - start)}


def run_side(side: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--side", side, "--images", str(args.images), "--val", str(args.val),
               "--epochs", str(args.epochs), "--data-repeats", str(args.data_repeats)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        sys.exit(f"{side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="train images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=8, help="validation images (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-repeats", type=int, default=4, help="passes over the train images for the data-path figure")
    parser.add_argument("--side", choices=["peer", "psyface"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        figures = peer(args) if args.side == "peer" else psyface_side(args)
        figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(figures))
        return
    print(f"bench_train: {args.images} train + {args.val} val images of the default data, {args.epochs} epoch(s), "
          f"{torch.get_num_threads()} threads")
    results = {side: run_side(side, args) for side in ("peer", "psyface")}
    for side, figures in results.items():
        print(f"  {side:8s} total {figures['total_s']:8.1f} s | data path {figures['data_img_per_s']:8.1f} img/s | "
              f"peak RSS {figures['peak_rss_mib']:7.0f} MiB")
    total = results["peer"]["total_s"] / results["psyface"]["total_s"]
    data = results["psyface"]["data_img_per_s"] / results["peer"]["data_img_per_s"]
    print(f"  total time ratio (peer / psyface): {total:.1f}x (target >= 20x)")
    print(f"  data-path throughput ratio (psyface / peer): {data:.1f}x (target >= 2x)")


if __name__ == "__main__":
    main()

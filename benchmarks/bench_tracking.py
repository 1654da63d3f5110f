"""Tracking cost, side by side in one run: the local SQLite store vs the team server.

The server is the real one `psyface server start` runs (PostgreSQL + `mlflow server --app-name
basic-auth`, proxied artifacts) in a temporary folder on this machine, so the figures are the HTTP +
authentication + PostgreSQL overhead without a network. Measured per store:
- per-epoch logging: `mlflow.log_metrics` of the dict the train stage logs each epoch (train/val
  loss, lr, val mean r, one r per attribute), `--epochs` times into one run; mean ms per epoch;
- model registration: `tracking.log_model` of a tiny psyface network (pyfunc + safetensors, artifacts
  uploaded, version registered), `--models` times; mean s per model.

    python benchmarks/bench_tracking.py [--epochs 50] [--models 3] [--attributes 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


def measure(uri: str, epochs: int, models: int, attributes: int, artifacts: Path | None = None) -> dict[str, float]:
    """Mean cost per epoch's metrics and per registered model against `uri` (`artifacts`: local folder
    for a SQLite store, which would otherwise write ./mlruns; a server keeps its own)."""
    from psyface import tracking
    from psyface.model import ModelSpec, build_model
    from psyface.training import png_bytes

    tracking.use_tracking(uri)
    experiment = f"bench-{secrets.token_hex(3)}"
    mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri() if artifacts else None)
    mlflow.set_experiment(experiment)
    names = [f"a{i}" for i in range(attributes)]
    spec = ModelSpec(arch="test_efficientnet", attributes=names, image_size=32, target_mean=[0.0] * attributes,
                     target_std=[1.0] * attributes, scales={n: [1.0, 9.0] for n in names})
    net = build_model("test_efficientnet", "gap", attributes).eval()
    example = pd.DataFrame({"image": [png_bytes(np.zeros((32, 32, 3), np.uint8))]})
    with mlflow.start_run():
        started = time.perf_counter()
        for epoch in range(epochs):
            mlflow.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_loss": 1.0, "val_mean_r": 0.5, "lr": 1e-3,
                                **{f"val_r_{n}": 0.5 for n in names}}, step=epoch)
        per_epoch = (time.perf_counter() - started) / epochs
        started = time.perf_counter()
        for _ in range(models):
            tracking.log_model(net, spec, "bench-model", example)
        per_model = (time.perf_counter() - started) / models
    return {"epoch_ms": per_epoch * 1000, "register_s": per_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--attributes", type=int, default=7)
    args = parser.parse_args()
    from psyface import server

    with tempfile.TemporaryDirectory(prefix="psyface-bench-") as folder:
        base = Path(folder)
        base.chmod(0o711)  # PostgreSQL's account passes through when this runs as root
        (base / "local").mkdir()
        sqlite = measure(f"sqlite:///{base / 'local' / 'mlflow.db'}", args.epochs, args.models, args.attributes,
                         base / "local" / "artifacts")
        password = secrets.token_urlsafe(16)
        root = server.init(base / "server", None, "admin").root
        state = server.start(root, server.LOOPBACK, server.free_port(), 2, password, 400)
        try:
            os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
            remote = measure(state.url, args.epochs, args.models, args.attributes)
        finally:
            server.stop(root)
    from psyface.training import cpuinfo_field

    cpu = cpuinfo_field("model name") or platform.processor() or "unknown CPU"
    print(f"tracking cost on {cpu} ({os.cpu_count()} cores), {args.epochs} epochs x "
          f"{4 + args.attributes} metrics, {args.models} tiny models")
    print(f"{'':28}{'SQLite (local)':>16}{'server (HTTP)':>16}{'server/SQLite':>15}")
    for key, label in (("epoch_ms", "per-epoch logging, ms"), ("register_s", "log + register model, s")):
        print(f"{label:28}{sqlite[key]:16.2f}{remote[key]:16.2f}{remote[key] / sqlite[key]:14.2f}x")


if __name__ == "__main__":
    main()

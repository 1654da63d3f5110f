"""The per-expression binary classifier: a small MLP on flattened landmark coordinates.

Pure functions: arrays in, a trained module or numbers out. The feature standardisation lives inside
the module (buffers), so Integrated Gradients, timing and the served model all see raw normalised
coordinates and nothing has to be re-applied outside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch import nn

from psyface.config import NonNegativeFloat, PositiveFloat, PositiveInt


@dataclass(frozen=True)
class TrainingParams:
    """How each binary classifier is trained (params.yaml `expressions.training`)."""

    hidden: PositiveInt = 64
    epochs: PositiveInt = 300
    batch_size: PositiveInt = 1024  # >= the training set: full-batch Adam, fastest on a few thousand faces
    learning_rate: PositiveFloat = 0.01
    weight_decay: NonNegativeFloat = 0.03  # strong L2: with ~1k faces the MLP otherwise fits identity noise


class LandmarkClassifier(nn.Module):
    """Standardise -> MLP -> one logit per face (positive = the expression is shown)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        n_features = mean.numel()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)


def train_classifier(
    features: np.ndarray, targets: np.ndarray, params: TrainingParams, seed: int
) -> LandmarkClassifier:
    """Fit one binary classifier with Adam on BCE; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    std = x.std(dim=0).clamp_min(1e-6)
    model = LandmarkClassifier(x.mean(dim=0), std, params.hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(params.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(params.batch_size):
            optimiser.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


def predict_proba(model: nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model(torch.as_tensor(features, dtype=torch.float32))).numpy()


def binary_scores(targets: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 at the 0.5 threshold, and the log loss (smoother, for choosing models)."""
    predicted = probabilities >= 0.5
    return {
        "accuracy": float(accuracy_score(targets, predicted)),
        "f1": float(f1_score(targets, predicted, zero_division=0.0)),
        "log_loss": float(log_loss(targets, probabilities, labels=[False, True])),
    }


def seconds_per_face(model: nn.Module, features: np.ndarray, repeats: int = 10) -> float:
    """Best-of-`repeats` wall time of one batched forward pass, divided by the number of faces."""
    x = torch.as_tensor(features, dtype=torch.float32)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best / len(x)

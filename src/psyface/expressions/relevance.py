"""Dataset-level Integrated Gradients per landmark, with the baselines of Di Luzio et al.

A landmark owns two input features (x, y). Its relevance for one face is |IG_x| + |IG_y| of the
classifier's logit, IG averaged over the baselines first (an expectation over reference faces, as
with several typical faces of the other classes); the dataset-level relevance is the mean over faces.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

Baseline = Literal["other_class", "mean_face"]


def typical_faces(features: np.ndarray, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """For each class, the face closest to that class's mean: (len(classes), n_features)."""
    rows = []
    for name in classes:
        members = features[labels == name]
        rows.append(members[np.argmin(((members - members.mean(axis=0)) ** 2).sum(axis=1))])
    return np.stack(rows)


def baselines_for(
    kind: Baseline, features: np.ndarray, labels: np.ndarray, positive: str, classes: list[str]
) -> np.ndarray:
    """The baselines of one expression: typical faces of every other class present, or the mean face."""
    if kind == "mean_face":
        return features.mean(axis=0, keepdims=True)
    others = [name for name in classes if name != positive and (labels == name).any()]
    return typical_faces(features, labels, others)


def landmark_relevance(
    model: nn.Module, inputs: np.ndarray, baselines: np.ndarray, n_steps: int = 32
) -> np.ndarray:
    """Mean over `inputs` of per-landmark |IG| of the model's logit: (n_features // 2,)."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    integrated_gradients = IntegratedGradients(model)
    attribution = torch.zeros_like(x)
    for baseline in torch.as_tensor(baselines, dtype=torch.float32):
        attribution += integrated_gradients.attribute(x, baselines=baseline.expand_as(x), n_steps=n_steps)
    per_feature = (attribution / len(baselines)).abs().detach().numpy()
    return per_feature.reshape(len(x), -1, 2).sum(axis=2).mean(axis=0)


def ranking(relevance: np.ndarray) -> np.ndarray:
    """Positions sorted from most to least relevant (ties keep the lower index first)."""
    return np.argsort(-relevance, kind="stable")

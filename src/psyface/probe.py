"""The linear-probe recipe for small rated sets: a frozen pretrained backbone, its pooled features
computed once for every face (optionally averaged with the mirror image), then a ridge head per
attribute whose penalty grouped cross-validation picks on the training faces.

The fitted ridge (feature standardisation included) folds into a ProbeNet's linear layer, so the
result is an ordinary network: registered, served, explained and audited like a fine-tuned one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from psyface.config import Bound, PositiveFloat, PositiveInt
from psyface.errors import PsyfaceError
from psyface.model import ProbeNet, to_input


@dataclass
class ProbeParams:
    """`train.probe`: used when `train.mode` is `probe`."""

    layers: list[str] = field(default_factory=list)  # backbone layers whose pooled outputs join the final features
    flip: bool = True  # features (and so predictions) averaged over each face and its mirror image
    alphas: list[PositiveFloat] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0])  # ridge penalties tried
    folds: Annotated[int, Bound(2)] = 5  # identity-grouped folds on the training faces that choose each attribute's penalty
    batch_size: PositiveInt = 64


@dataclass
class RidgeHeads:
    """One ridge per attribute on standardised features: ((features - mean) / std) @ coef.T + intercept."""

    coef: np.ndarray  # (n_attributes, n_features)
    intercept: np.ndarray  # (n_attributes,)
    alphas: np.ndarray  # the penalty chosen for each attribute
    mean: np.ndarray  # (n_features,) of the faces fitted on
    std: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std @ self.coef.T + self.intercept


def extract_features(net: ProbeNet, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     flip: bool, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(N, n_features) float64 pooled features of uint8 (N, H, W, 3) faces, each the mean over the
    face and its mirror image when `flip`."""
    device = next(net.parameters()).device
    net.eval()
    chunks = []
    starts = range(0, len(images), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="probe: features", unit="batch", disable=not progress, leave=False):
            batch = to_input(images[start : start + batch_size], device, mean, std)
            features = net.pooled(batch)
            if flip:
                features = (features + net.pooled(batch.flip(3))) / 2
            chunks.append(features.double().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, net.last_layer.in_features))


def fit_heads(features: np.ndarray, targets: np.ndarray, groups: np.ndarray, alphas: Sequence[float],
              folds: int) -> RidgeHeads:
    """Standardise features, choose each attribute's penalty by `folds`-fold grouped CV (lowest
    held-out squared error), refit on all rows with scikit-learn's Ridge.

    scikit-learn's RidgeCV picks a per-target penalty only with its leave-one-out shortcut, which
    leaks identities across folds (with a grouped splitter it refits per penalty and shares one
    across targets), so the grouped search is `ridge_path_errors` below."""
    n_groups = len(np.unique(groups))
    if not 2 <= folds <= n_groups:
        raise PsyfaceError(f"train.probe.folds must be between 2 and the training groups ({n_groups}), got {folds}")
    if not alphas or min(alphas) <= 0:
        raise PsyfaceError(f"train.probe.alphas must be positive penalties, got {list(alphas)}")
    scaler = robust_scaler(features)
    z = scaler.transform(features)
    errors = np.zeros((len(alphas), targets.shape[1]))
    for fit_rows, held_out in GroupKFold(n_splits=folds).split(z, groups=groups):
        errors += ridge_path_errors(z[fit_rows], targets[fit_rows], z[held_out], targets[held_out], alphas)
    chosen = np.asarray(alphas, dtype=np.float64)[errors.argmin(0)]
    ridge = Ridge(alpha=chosen).fit(z, targets)
    return RidgeHeads(coef=np.atleast_2d(ridge.coef_), intercept=np.atleast_1d(ridge.intercept_), alphas=chosen,
                      mean=scaler.mean_, std=scaler.scale_)


def ridge_path_errors(x: np.ndarray, y: np.ndarray, x_held: np.ndarray, y_held: np.ndarray,
                      alphas: Sequence[float]) -> np.ndarray:
    """Held-out squared error summed per target, (n_alphas, n_targets), of ridge with intercept
    (what sklearn's Ridge fits) for every penalty from one eigendecomposition (of X'X or of XX',
    whichever is smaller): the same trick RidgeCV uses for leave-one-out, here for a held-out fold.
    Fitting one Ridge per penalty instead costs a factorisation each, which made psyface's probe
    slower than the hand-written baseline."""
    from scipy.linalg import eigh

    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc, held = x - x_mean, y - y_mean, x_held - x_mean
    errors = np.empty((len(alphas), y.shape[1]))
    if xc.shape[1] <= xc.shape[0]:
        values, vectors = eigh(xc.T @ xc)
        projected = vectors.T @ (xc.T @ yc)
        held_basis = held @ vectors
    else:
        values, vectors = eigh(xc @ xc.T)
        projected = vectors.T @ yc
        held_basis = held @ (xc.T @ vectors)
    for i, alpha in enumerate(alphas):
        predicted = held_basis @ (projected / (np.clip(values, 0, None) + alpha)[:, None]) + y_mean
        errors[i] = ((predicted - y_held) ** 2).sum(0)
    return errors


def robust_scaler(features: np.ndarray) -> StandardScaler:
    """StandardScaler, except that features varying less than 1e-6 of the most variable one count as
    constant (scale 1, as sklearn does for exactly constant ones): dividing float32 noise by a
    near-zero SD would make the network's predictions depend on its batch size."""
    scaler = StandardScaler().fit(features)
    scaler.scale_[scaler.scale_ < 1e-6 * scaler.scale_.max()] = 1.0
    return scaler


def set_head(net: ProbeNet, heads: RidgeHeads) -> ProbeNet:
    """Copy the standardisation and the ridge weights into the network (float32)."""
    with torch.no_grad():
        net.feature_mean.copy_(torch.as_tensor(heads.mean, dtype=torch.float32))
        net.feature_std.copy_(torch.as_tensor(heads.std, dtype=torch.float32))
        net.last_layer.weight.copy_(torch.as_tensor(heads.coef, dtype=torch.float32))
        net.last_layer.bias.copy_(torch.as_tensor(heads.intercept, dtype=torch.float32))
    return net


def freeze(net: ProbeNet) -> ProbeNet:
    """No gradients through the backbone; eval mode keeps batch-norm statistics as loaded."""
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.eval()


def features_key(net: ProbeNet, images: np.ndarray, mean: Sequence[float], std: Sequence[float], flip: bool) -> str:
    """What the cached features depend on: the backbone's weights, the taps, the images, the
    normalisation and the flip; a changed ridge grid reuses them."""
    digest = hashlib.sha256(repr((net.taps, list(mean), list(std), flip, images.shape)).encode())
    for name, tensor in net.features.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:20]

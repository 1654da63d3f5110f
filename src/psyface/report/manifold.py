"""Manifold view: 2-D embeddings of what the network sees, and numbers for "is there structure".

Two feature sets are embedded: the penultimate features (`AttributeNet.embed`) and, as in Xiao
(2024), the vector of predicted attributes. Each is embedded with t-SNE and UMAP (seeded). Pictures
alone invite over-reading, so every embedding comes with:

- trustworthiness (how well the 2-D neighbourhoods respect the full-feature ones), and
- per attribute, the cross-validated k-NN R² of the rating from the 2-D points and from the full
  features; their ratio is the share of the attribute the manifold keeps. An attribute the face
  does not carry (the synthetic `control`) scores near 0 on both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE, trustworthiness
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, KFold, cross_val_predict
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

Method = Literal["tsne", "umap"]
# Below this full-feature R² the attribute is not in the features at all: a "share kept" is noise.
MIN_R2_FOR_SHARE = 0.05


@dataclass(frozen=True)
class EmbeddingParams:
    """Seeded settings of both methods (UMAP defaults follow Xiao 2024: 40 neighbours, min_dist 0.1)."""

    tsne_perplexity: float = 30.0
    tsne_max_iter: int = 500
    umap_n_neighbors: int = 40
    umap_min_dist: float = 0.1
    pca_components: int = 50  # wider features are reduced first (the usual t-SNE practice; faster)
    seed: int = 42


def standardise(features: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance columns (constant columns stay 0) so no unit dominates distances."""
    features = np.asarray(features, dtype=np.float64)
    spread = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def embed_2d(features: np.ndarray, method: Method, params: EmbeddingParams) -> np.ndarray:
    """2-D coordinates (n, 2) of standardised `features` by t-SNE or UMAP, deterministic given the seed."""
    points = standardise(features)
    n = len(points)
    components = min(params.pca_components, n)
    if points.shape[1] > components:
        points = PCA(n_components=components, random_state=params.seed).fit_transform(points)
    if method == "tsne":
        perplexity = min(params.tsne_perplexity, (n - 1) / 3)
        model = TSNE(n_components=2, perplexity=perplexity, max_iter=params.tsne_max_iter, init="pca",
                     random_state=params.seed)
        # One OpenMP thread: on a busy 2-core machine the threaded gradient spins ~10x slower.
        with threadpool_limits(limits=1, user_api="openmp"):
            return model.fit_transform(points)
    if method == "umap":
        import umap  # slow import (numba); only when asked

        neighbours = min(params.umap_n_neighbors, n - 1)
        # Exact neighbours from scikit-learn's BLAS distances: below 4,096 points umap-learn computes
        # every distance by calling its numba metric from Python and JIT-compiles its sort, ~20 s of a
        # 1,500-face report. As umap-learn's own, each point leads its row at distance exactly 0
        # (its membership weights start from the first distance above 0).
        others, nearest = NearestNeighbors(n_neighbors=neighbours - 1).fit(points).kneighbors()
        indices = np.hstack([np.arange(n)[:, None], nearest])
        distances = np.hstack([np.zeros((n, 1)), others])
        model = umap.UMAP(
            n_neighbors=neighbours, min_dist=params.umap_min_dist, random_state=params.seed, n_jobs=1,
            precomputed_knn=(indices, distances),
        )
        with warnings.catch_warnings():  # no search index comes with the neighbours: `transform` is never used
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
            return np.asarray(model.fit_transform(points))
    raise ValueError(f"unknown embedding method {method!r}")


def knn_r2(
    points: np.ndarray,
    target: np.ndarray,
    groups: Sequence | None = None,
    n_neighbors: int = 10,
    folds: int = 5,
    seed: int = 42,
) -> float:
    """Out-of-fold R² of a k-NN regressor predicting `target` from `points`.

    Folds keep `groups` (e.g. identities) together when given, so a face's twin cannot leak its rating.
    """
    points = np.asarray(points, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if groups is not None and len(set(groups)) >= folds:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        splitter, groups = KFold(n_splits=folds, shuffle=True, random_state=seed), None
    neighbours = min(n_neighbors, int(len(points) * (folds - 1) / folds) - 1)
    model = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=neighbours))
    predicted = cross_val_predict(model, points, target, groups=groups, cv=splitter)
    return float(r2_score(target, predicted))


def share_kept(r2_embedding: float, r2_full: float) -> float | None:
    """R² from 2-D over R² from the full features; None when the features hold no signal to keep."""
    if r2_full < MIN_R2_FOR_SHARE:
        return None
    return r2_embedding / r2_full


def structure_numbers(
    features: np.ndarray,
    embedding: np.ndarray,
    targets: dict[str, np.ndarray],
    scored: np.ndarray,
    groups: Sequence | None = None,
    trust_neighbors: int = 10,
    knn_neighbors: int = 10,
    folds: int = 5,
    seed: int = 42,
) -> dict:
    """Trustworthiness of `embedding` and, per attribute, k-NN R² from 2-D vs full features.

    `scored` (boolean mask) picks the images the R² is measured on: held-out faces, so features that
    memorised training ratings cannot fake structure.
    """
    full = standardise(features)
    scored = np.asarray(scored, dtype=bool)
    subset_groups = None if groups is None else np.asarray(groups)[scored]
    attributes = {}
    for name, values in targets.items():
        values = np.asarray(values, dtype=np.float64)[scored]
        r2_2d = knn_r2(embedding[scored], values, subset_groups, knn_neighbors, folds, seed)
        r2_full = knn_r2(full[scored], values, subset_groups, knn_neighbors, folds, seed)
        attributes[name] = {"knn_r2_2d": r2_2d, "knn_r2_full": r2_full, "share_kept": share_kept(r2_2d, r2_full)}
    return {
        "trustworthiness": float(trustworthiness(full, embedding, n_neighbors=trust_neighbors)),
        "n_images": int(len(full)),
        "n_scored": int(scored.sum()),
        "attributes": attributes,
    }

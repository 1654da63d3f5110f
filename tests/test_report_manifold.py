"""Manifold numbers: structure is found where it exists and not where it does not."""

from __future__ import annotations

import numpy as np
import pytest

from psyface.report import manifold


@pytest.fixture(scope="module")
def faces() -> dict[str, np.ndarray]:
    """Features carrying `signal` on a curved 1-D manifold plus noise dims; `control` is unrelated."""
    rng = np.random.default_rng(0)
    n = 240
    signal = rng.uniform(-2, 2, n)
    features = np.column_stack([np.cos(signal), np.sin(signal), signal, 0.1 * rng.normal(size=(n, 7))])
    return {"features": features, "signal": signal + 0.1 * rng.normal(size=n), "control": rng.normal(size=n)}


def test_tsne_keeps_the_signal_and_finds_no_control(faces: dict[str, np.ndarray]) -> None:
    params = manifold.EmbeddingParams(tsne_perplexity=20, tsne_max_iter=400, seed=3)
    embedding = manifold.embed_2d(faces["features"], "tsne", params)
    assert embedding.shape == (240, 2)
    np.testing.assert_allclose(embedding, manifold.embed_2d(faces["features"], "tsne", params))  # seeded

    scored = np.arange(240) % 3 != 0
    numbers = manifold.structure_numbers(faces["features"], embedding,
                                         {"signal": faces["signal"], "control": faces["control"]}, scored)
    assert numbers["trustworthiness"] > 0.9
    assert numbers["n_scored"] == scored.sum()
    signal, control = numbers["attributes"]["signal"], numbers["attributes"]["control"]
    assert signal["knn_r2_full"] > 0.8 and signal["knn_r2_2d"] > 0.8
    assert 0.8 < signal["share_kept"] <= 1.2
    assert abs(control["knn_r2_2d"]) < 0.2 and abs(control["knn_r2_full"]) < 0.2
    assert control["share_kept"] is None  # nothing to keep


def test_scrambled_embedding_is_untrustworthy(faces: dict[str, np.ndarray]) -> None:
    random_points = np.random.default_rng(1).normal(size=(240, 2))
    numbers = manifold.structure_numbers(faces["features"], random_points, {"signal": faces["signal"]},
                                         np.ones(240, bool))
    assert numbers["trustworthiness"] < 0.65
    assert numbers["attributes"]["signal"]["knn_r2_2d"] < 0.1


def test_identity_folds_stop_twins_leaking_ratings() -> None:
    """Two images of a person share features and rating: plain folds 'predict' it from the twin."""
    rng = np.random.default_rng(2)
    people = rng.normal(size=(100, 5))
    rating = rng.normal(size=100)
    features, target = np.repeat(people, 2, axis=0), np.repeat(rating, 2)
    identities = np.repeat(np.arange(100), 2)
    leaked = manifold.knn_r2(features, target, None, n_neighbors=1)
    honest = manifold.knn_r2(features, target, identities, n_neighbors=1)
    assert leaked > 0.4  # the twin is in the other folds 4 times in 5
    assert honest < 0.1


def test_standardise_handles_constant_columns() -> None:
    scaled = manifold.standardise(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(scaled, [[-1.0, 0.0], [1.0, 0.0]])


def test_share_is_undefined_without_signal() -> None:
    assert manifold.share_kept(0.3, 0.6) == pytest.approx(0.5)
    assert manifold.share_kept(0.01, 0.02) is None

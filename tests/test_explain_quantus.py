"""psyface's localisation scores are the literature's: the same numbers as Quantus 0.6 (a dev
dependency) on the same maps, for hand-made maps and for a tiny model's Integrated Gradients.

Maps here have no ties at the top: psyface counts tied pixels by their share in the mask, Quantus
by its sort order (rank accuracy) or as a hit if any is inside (pointing game)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psyface.explain.methods import MethodOptions, attribute
from psyface.explain.scores import pointing_game, relevance, relevance_mass_accuracy, relevance_rank_accuracy
from tests.explain_models import SIZE, box, images, region_model  # noqa: F401 (images: a fixture)

quantus = pytest.importorskip("quantus")

MOUTH = box(20, 28, 8, 24)


def quantus_scores(inputs: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> dict[str, np.ndarray]:
    """Quantus on precomputed |maps| (a_batch, so no model), without its max-normalisation (a
    ratio of sums, and the ranks and the peak, do not change under scaling)."""
    batch = {"model": None, "x_batch": inputs.numpy(), "y_batch": np.zeros(len(inputs), dtype=np.int64),
             "a_batch": maps[:, None].numpy(), "s_batch": masks[:, None].numpy().astype(np.float32)}
    options = {"abs": True, "normalise": False, "disable_warnings": True}
    return {
        "relevance_mass_accuracy": np.asarray(quantus.RelevanceMassAccuracy(**options)(**batch), dtype=np.float64),
        "relevance_rank_accuracy": np.asarray(quantus.RelevanceRankAccuracy(**options)(**batch), dtype=np.float64),
        "pointing_game": np.asarray(quantus.PointingGame(**options)(**batch), dtype=np.float64),
    }


def psyface_scores(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, np.ndarray]:
    rel = relevance(maps)
    return {"relevance_mass_accuracy": relevance_mass_accuracy(rel, masks),
            "relevance_rank_accuracy": relevance_rank_accuracy(rel, masks),
            "pointing_game": pointing_game(rel, masks)}


def test_scores_equal_quantus_on_random_maps_and_masks_of_every_size():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(12, SIZE, SIZE, generator=generator) ** 3  # peaked, signed, without ties
    masks = torch.zeros(12, SIZE, SIZE, dtype=torch.bool)
    for row in range(12):
        top, left = torch.randint(0, SIZE - 8, (2,), generator=generator).tolist()
        masks[row, top : top + 2 + row, left : left + 3 + 2 * row] = True
    masks[0, : SIZE // 2] = True  # a large mask
    maps[1] += 100 * masks[1]  # a map whose peak is in its mask (a pointing-game hit)
    inputs = torch.rand(12, 3, SIZE, SIZE, generator=generator)
    ours, theirs = psyface_scores(maps, masks), quantus_scores(inputs, maps, masks)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, err_msg=name)
    assert ours["pointing_game"][1] == 1.0 and 0 < ours["relevance_rank_accuracy"].mean() < 1


def test_scores_equal_quantus_on_a_tiny_models_integrated_gradients(images):
    maps = attribute(region_model(MOUTH), images, "integrated_gradients", MethodOptions(ig_steps=8))[:, 0]
    masks = box(20, 28, 8, 16).expand(len(images), SIZE, SIZE)  # half the mouth the model sees (no ties in its top)
    ours, theirs = psyface_scores(maps, masks), quantus_scores(images, maps, masks)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, err_msg=name)
    assert 0.2 < ours["relevance_mass_accuracy"].mean() < 0.8  # a partial overlap: a real test of both

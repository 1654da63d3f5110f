from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution

from psyface.explain.methods import MethodOptions, attribute
from psyface.explain.scores import (
    area_under_curve,
    deletion_curves,
    grid_ceiling,
    mask_share,
    pointing_game,
    random_order,
    randomisation_correlation,
    randomised_copy,
    rank_correlation,
    relevance,
    relevance_mass_accuracy,
)
from tests.explain_models import (  # noqa: F401 (images: a fixture)
    SIZE,
    box,
    images,
    region_model,
    tiny_vgg,
)

MOUTH = box(20, 28, 8, 24)
EYES = box(6, 12, 4, 28)


def test_relevance_mass_accuracy_and_pointing_game_on_hand_made_maps():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0  # 3/4 of the mass in the mask, the peak too
    maps[1, 3, 3] = 2.0  # all mass outside
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    np.testing.assert_allclose(relevance_mass_accuracy(maps, masks), [0.75, 0.0])
    np.testing.assert_allclose(pointing_game(maps, masks), [1.0, 0.0])
    np.testing.assert_allclose(mask_share(masks), [0.25, 0.25])


def test_scores_are_undefined_without_a_mask_or_without_relevance():
    maps = torch.ones(2, 4, 4)
    maps[1] = 0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 0, 0] = True
    assert np.isnan(relevance_mass_accuracy(maps, masks)).all()
    assert np.isnan(pointing_game(maps, masks)).all()


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "occlusion"])
def test_a_model_that_only_sees_the_mouth_scores_near_one_on_the_mouth_and_near_zero_on_the_eyes(method, images):
    options = MethodOptions(ig_steps=8, occlusion_window=4, occlusion_stride=4)
    looks_at_mouth = relevance(attribute(region_model(MOUTH), images, method, options))[:, 0]
    looks_at_eyes = relevance(attribute(region_model(EYES), images, method, options))[:, 0]
    masks = MOUTH.expand(len(images), SIZE, SIZE)
    assert relevance_mass_accuracy(looks_at_mouth, masks).min() > 0.95
    assert pointing_game(looks_at_mouth, masks).min() == 1.0
    assert relevance_mass_accuracy(looks_at_eyes, masks).max() < 0.05
    assert pointing_game(looks_at_eyes, masks).max() == 0.0
    assert mask_share(masks)[0] == pytest.approx(8 * 16 / SIZE**2)


def test_deleting_the_pixels_a_model_uses_first_beats_a_random_order(images):
    model = region_model(MOUTH)
    faithful = MOUTH.float().expand(len(images), 1, SIZE, SIZE)
    curves = deletion_curves(model, images, faithful, steps=8)
    random = deletion_curves(model, images, random_order(faithful.shape, seed=0), steps=8)
    assert curves.shape == (3, 1, 9)
    assert (curves[..., 0] == 0).all()
    np.testing.assert_allclose(curves[..., -1], random[..., -1], rtol=1e-5)  # all deleted: same image
    np.testing.assert_allclose(curves[..., 1], curves[..., -1], rtol=1e-5)  # first 1/8 = the mouth
    assert (area_under_curve(curves) > 1.5 * area_under_curve(random)).all()


def test_rank_correlation_is_one_for_monotone_maps_and_zero_for_constant_ones():
    first = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    second = np.array([[10.0, 20.0, 30.0, 400.0], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_allclose(rank_correlation(first, second), [1.0, 0.0])
    np.testing.assert_allclose(rank_correlation(first[:1], -second[:1]), [-1.0])


def test_a_method_that_ignores_the_weights_fails_the_randomisation_check(images):
    def edge_detector(model, batch):  # looks only at the image: same map for any weights
        edges = (batch[..., 1:, :] - batch[..., :-1, :]).abs().sum(1)
        return edges[:, None].expand(-1, 3, -1, -1)

    def check(explain, model):
        return randomisation_correlation(explain(model, images), explain(randomised_copy(model, seed=0), images))

    ignores_weights = check(edge_detector, tiny_vgg())
    uses_weights = check(lambda model, batch: attribute(model, batch, "gradcam"), tiny_vgg(seed=3))
    assert ignores_weights.shape == (9,)
    assert ignores_weights.mean() == pytest.approx(1.0)
    assert uses_weights.mean() < ignores_weights.mean() - 0.3


def test_grid_ceiling_is_chance_on_one_cell_one_on_pixels_and_bounds_every_map_on_the_grid():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 8:24] = True  # a quarter of the image
    masks[1, 14:18, 14:18] = True  # 16 pixels in the middle
    np.testing.assert_allclose(grid_ceiling(masks, (1, 1)), mask_share(masks), rtol=1e-5)  # one cell: uniform map
    np.testing.assert_allclose(grid_ceiling(masks, (32, 32)), [1.0, 1.0], atol=1e-6)  # a pixel inside the mask

    grid = (4, 4)
    ceiling = grid_ceiling(masks, grid)
    cells = torch.rand(200, 1, *grid, generator=torch.Generator().manual_seed(0)) ** 4  # peaked non-negative maps
    cells[:16] = torch.eye(16).reshape(16, 1, *grid)  # every single cell on its own
    upsampled = LayerAttribution.interpolate(cells, (32, 32), interpolate_mode="bilinear")[:, 0]
    for row in range(2):
        scores = relevance_mass_accuracy(upsampled, masks[row].expand(200, 32, 32))
        assert scores.max() == pytest.approx(ceiling[row], rel=1e-5)  # reached by a single cell, never beaten
    assert 0.7 < ceiling[0] < 1.0 and ceiling[1] < 0.1  # the quarter nearly holds a blurred cell; 16 pixels do not


def test_randomisation_correlation_ranks_magnitudes_unless_asked_for_signs():
    maps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(randomisation_correlation(maps, -maps), 1.0, atol=1e-9)  # same |map|
    np.testing.assert_allclose(randomisation_correlation(maps, -maps, signed=True), -1.0, atol=1e-9)
    np.testing.assert_allclose(randomisation_correlation(maps, maps, signed=True), 1.0, atol=1e-9)

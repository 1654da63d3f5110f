from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution
from torch import nn

from psyface.explain.methods import MethodOptions, attribute
from psyface.explain.scores import (
    area_under_curve,
    bootstrap_mean_interval,
    cascade_steps,
    cascading_randomisation,
    covering_score,
    grid_ceiling,
    mask_share,
    other_identity_donors,
    perturbation_curves,
    pointing_game,
    random_order,
    randomisation_correlation,
    rank_correlation,
    region_share,
    relevance,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    swap_changes,
)
from psyface.model import AttributeEnsemble
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


def test_relevance_rank_accuracy_counts_the_mask_sized_top_of_the_map():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, 0, :] = True  # K = 4 pixels
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, :] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # the top 4 are the mask: 1
    maps[1, 0, :2], maps[1, 3, :] = 9.0, torch.tensor([5.0, 6.0, 7.0, 8.0])  # top 4: 2 in the mask, 2 below it
    maps[1, 0, 2:] = 1.0
    maps[2] = 0.0  # no relevance: undefined
    np.testing.assert_allclose(relevance_rank_accuracy(maps, masks), [1.0, 0.5, np.nan])
    sparse = torch.zeros(1, 4, 4)
    sparse[0, 0, 0], sparse[0, 3, 3] = 2.0, 1.0  # 2 of the top 4 places go to the 14 zeros, 3 of them in the mask
    assert relevance_rank_accuracy(sparse, masks[:1])[0] == pytest.approx((1 + 2 * 3 / 14) / 4)
    flat = torch.ones(1, 4, 4)  # every pixel ties at the peak: the pointing game scores chance
    assert pointing_game(flat, masks[:1])[0] == pytest.approx(0.25)
    # Mass counts how much the top carries, rank only where it is: 20 of the 46 units of mass are inside
    assert relevance_mass_accuracy(maps[1:2], masks[1:2])[0] == pytest.approx(20 / 46)


def test_scores_are_undefined_without_a_mask_or_without_relevance():
    maps = torch.ones(2, 4, 4)
    maps[1] = 0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 0, 0] = True
    assert np.isnan(relevance_mass_accuracy(maps, masks)).all()
    assert np.isnan(pointing_game(maps, masks)).all()
    assert np.isnan(relevance_rank_accuracy(maps, masks)).all()


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "occlusion"])
def test_a_model_that_only_sees_the_mouth_scores_near_one_on_the_mouth_and_near_zero_on_the_eyes(method, images):
    options = MethodOptions(ig_steps=8, occlusion_window=4, occlusion_stride=4)
    looks_at_mouth = relevance(attribute(region_model(MOUTH), images, method, options))[:, 0]
    looks_at_eyes = relevance(attribute(region_model(EYES), images, method, options))[:, 0]
    masks = MOUTH.expand(len(images), SIZE, SIZE)
    assert relevance_mass_accuracy(looks_at_mouth, masks).min() > 0.95
    assert relevance_rank_accuracy(looks_at_mouth, masks).min() > 0.7
    assert pointing_game(looks_at_mouth, masks).min() == 1.0
    assert relevance_mass_accuracy(looks_at_eyes, masks).max() < 0.05
    assert relevance_rank_accuracy(looks_at_eyes, masks).max() < 0.05
    assert pointing_game(looks_at_eyes, masks).max() == 0.0
    assert mask_share(masks)[0] == pytest.approx(8 * 16 / SIZE**2)


def test_deleting_or_inserting_the_pixels_a_model_uses_first_beats_a_random_order(images):
    model = region_model(MOUTH)
    faithful = MOUTH.float().expand(len(images), 1, SIZE, SIZE)
    deletion, insertion = perturbation_curves(model, images, faithful, steps=8)
    random_deletion, random_insertion = perturbation_curves(model, images, random_order(faithful.shape, seed=0), steps=8)
    assert deletion.shape == insertion.shape == (3, 1, 9)
    assert (deletion[..., 0] == 0).all() and (insertion[..., 0] == 0).all()
    # All deleted is the baseline image; all inserted is the image itself: both curves end at |f(x) - f(baseline)|
    np.testing.assert_allclose(deletion[..., -1], random_deletion[..., -1], rtol=1e-5)
    np.testing.assert_allclose(insertion[..., -1], deletion[..., -1], rtol=1e-5)
    np.testing.assert_allclose(deletion[..., 1], deletion[..., -1], rtol=1e-5)  # first 1/8 = the mouth
    np.testing.assert_allclose(insertion[..., 1], insertion[..., -1], rtol=1e-5)  # inserting it restores f(x)
    assert (area_under_curve(deletion) > 1.5 * area_under_curve(random_deletion)).all()
    assert (area_under_curve(insertion) > 1.5 * area_under_curve(random_insertion)).all()


def test_perturbation_curves_match_their_definition_image_by_image_for_every_attribute():
    """The batched curves (each image and the baseline predicted once, both ends filled in) against
    the docstring's definition evaluated one perturbed image at a time, at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3)).eval()
    images, orders, steps = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6), 4
    deletion, insertion = perturbation_curves(model, images, orders, steps, batch_size=5)
    with torch.no_grad():
        baseline = model(torch.zeros(1, 3, 6, 6))[0]
        for i, image in enumerate(images):
            full = model(image[None])[0]
            for a in range(3):
                order = orders[i, a].flatten().argsort(descending=True)
                for k in range(steps + 1):
                    top = torch.zeros(36, dtype=torch.bool)
                    top[order[: round(k * 36 / steps)]] = True
                    top = top.view(1, 6, 6)
                    deleted = model((image * ~top)[None])[0, a]
                    kept = model((image * top)[None])[0, a]
                    assert deletion[i, a, k] == pytest.approx(abs(full[a] - deleted).item(), abs=1e-5)
                    expected = abs(baseline[a] - full[a]) - abs(full[a] - kept)
                    assert insertion[i, a, k] == pytest.approx(expected.item(), abs=1e-5)


def test_insertion_of_the_wrong_region_first_stays_at_the_baseline(images):
    model = region_model(MOUTH)
    wrong = EYES.float().expand(len(images), 1, SIZE, SIZE)
    _, insertion = perturbation_curves(model, images, wrong, steps=8)
    np.testing.assert_allclose(insertion[..., 1], 0, atol=1e-6)  # the eyes inserted: the mouth is still grey


def test_rank_correlation_is_one_for_monotone_maps_and_zero_for_constant_ones():
    first = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    second = np.array([[10.0, 20.0, 30.0, 400.0], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_allclose(rank_correlation(first, second), [1.0, 0.0])
    np.testing.assert_allclose(rank_correlation(first[:1], -second[:1]), [-1.0])


def edge_detector(model, batch):
    """A "method" that looks only at the image: the same map for any weights."""
    edges = (batch[..., 1:, :] - batch[..., :-1, :]).abs().sum(1)
    return edges[:, None].expand(-1, 3, -1, -1)


def cascade_correlations(explain, model, images) -> dict[str, float]:
    trained = explain(model, images)
    return {step: float(randomisation_correlation(trained, explain(randomised, images)).mean())
            for step, randomised in cascading_randomisation(model, seed=0)}


def test_a_method_that_ignores_the_weights_fails_the_cascading_randomisation_and_gradcam_does_not(images):
    ignores_weights = cascade_correlations(edge_detector, tiny_vgg(), images)
    uses_weights = cascade_correlations(lambda model, batch: attribute(model, batch, "gradcam"), tiny_vgg(seed=3), images)
    assert list(ignores_weights) == list(uses_weights) == ["head", "block3", "block2", "block1"]
    assert all(value == pytest.approx(1.0) for value in ignores_weights.values())
    assert all(value < 0.2 for value in uses_weights.values())  # the default sanity_threshold, at every step


def test_the_cascade_randomises_from_the_output_down_cumulatively_and_leaves_the_model_alone():
    model = tiny_vgg()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    conv_names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    changed_by_step = {}
    for step, randomised in cascading_randomisation(model, seed=0):
        state = randomised.state_dict()
        changed_by_step[step] = [name for name in conv_names if not torch.equal(state[f"{name}.weight"], original[f"{name}.weight"])]
    assert changed_by_step == {
        "head": ["last_layer"],
        "block3": ["features.6", "last_layer"],
        "block2": ["features.3", "features.6", "last_layer"],
        "block1": ["features.0", "features.3", "features.6", "last_layer"],
    }
    assert all(torch.equal(value, original[name]) for name, value in model.state_dict().items())


def test_an_ensemble_randomises_the_same_step_of_every_member():
    ensemble = AttributeEnsemble([tiny_vgg(n_outputs=1), tiny_vgg(n_outputs=1, seed=1)])
    steps = cascade_steps(ensemble)
    assert [name for name, _ in steps] == ["head", "block3", "block2", "block1"]
    assert steps[0][1] == [member.last_layer for member in ensemble.members]


def test_bootstrap_interval_holds_the_mean_narrows_with_more_faces_and_resamples_identities():
    rng = np.random.default_rng(0)
    few = rng.random(20)
    many = rng.random(2000)
    for values in (few, many):
        low, high = bootstrap_mean_interval(values, np.arange(len(values)), n_boot=500, level=0.95, seed=0)
        assert low < values.mean() < high
    few_width = np.subtract(*bootstrap_mean_interval(few, np.arange(20), 500, 0.95, 0)[::-1])
    many_width = np.subtract(*bootstrap_mean_interval(many, np.arange(2000), 500, 0.95, 0)[::-1])
    assert many_width < few_width / 5  # ~ 1/sqrt(n)
    # Two faces per person with the same score: 40 faces are 20 independent ones, not 40
    twins = np.repeat(few, 2)
    grouped = bootstrap_mean_interval(twins, np.repeat(np.arange(20), 2), 500, 0.95, 0)
    ungrouped = bootstrap_mean_interval(twins, np.arange(40), 500, 0.95, 0)
    assert np.subtract(*grouped[::-1]) > 1.2 * np.subtract(*ungrouped[::-1])
    with_nan = bootstrap_mean_interval(np.array([np.nan, 0.5, 0.7, np.nan]), np.arange(4), 200, 0.95, 0)
    assert 0.5 <= with_nan[0] <= with_nan[1] <= 0.7  # undefined scores are left out, not counted as 0
    assert np.isnan(bootstrap_mean_interval(np.array([0.5, 0.5]), np.array([1, 1]), 200, 0.95, 0)).all()


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


def test_covering_score_is_the_mask_drawn_on_the_grid_and_never_above_the_ceiling():
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[0] = True  # the whole image: nothing to lose
    masks[1, :8, :8] = True  # exactly one cell of the 4x4 grid: its covering map is that cell
    masks[2, 4:20, 6:30] = True  # a rectangle across cells it fills unevenly
    masks[3, 14:18, 14:18] = True  # 16 pixels across four cells' corners
    grid = (4, 4)
    covering, ceiling = covering_score(masks, grid), grid_ceiling(masks, grid)
    assert covering[0] == pytest.approx(1.0)
    assert covering[1] == pytest.approx(ceiling[1], rel=1e-5)  # one cell: the best cell itself
    assert np.all(covering <= ceiling + 1e-6) and covering[2] < ceiling[2]  # cells filled unevenly: the emptier ones score less
    np.testing.assert_allclose(covering_score(masks, (32, 32)), 1.0, atol=1e-6)  # the pixel grid loses nothing
    cells = torch.nn.functional.adaptive_avg_pool2d(masks[2:3].float()[:, None], grid)  # by hand: the pooled mask, upsampled
    by_hand = LayerAttribution.interpolate(cells, (32, 32), interpolate_mode="bilinear")[0, 0]
    assert covering[2] == pytest.approx(float((by_hand * masks[2]).sum() / by_hand.sum()), rel=1e-5)
    assert 0.5 < covering[2] < 0.95 and covering[3] < 0.2  # the rectangle loses its rim; 16 pixels most of it
    assert np.isnan(covering_score(torch.zeros(1, 32, 32, dtype=torch.bool), grid)).all()


def test_donors_are_always_another_identity_and_seeded():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    donors = other_identity_donors(groups, seed=3)
    assert donors.shape == (6,) and np.all(groups[donors] != groups)
    np.testing.assert_array_equal(donors, other_identity_donors(groups, seed=3))
    assert other_identity_donors(np.array(["a", "a"]), seed=0) is None  # nobody to swap with


def test_swap_changes_are_the_output_moves_of_swapping_the_region_or_the_rest(images):
    """A model of the mouth alone moves only when the mouth is swapped; a model of the eyes only when
    the rest (which holds the eyes) is; each change equals the composite image's, computed by hand."""
    donors = images.flip(0)
    masks = MOUTH.expand(3, SIZE, SIZE)
    for region, expected in ((MOUTH, 1.0), (EYES, 0.0)):
        model = region_model(region)
        region_changes, rest_changes = swap_changes(model, images, donors, masks, target=0)
        with torch.no_grad():
            full = model(images)[:, 0]
            by_hand_region = (full - model(torch.where(masks[:, None], donors, images))[:, 0]).abs()
            by_hand_rest = (full - model(torch.where(masks[:, None], images, donors))[:, 0]).abs()
        np.testing.assert_allclose(region_changes, by_hand_region.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rest_changes, by_hand_rest.numpy(), rtol=1e-5, atol=1e-7)
        assert region_share(region_changes, rest_changes) == pytest.approx(expected, abs=1e-4)  # float32 sums
    both = region_model(MOUTH | EYES)  # reads both: a share strictly between
    assert 0.05 < region_share(*swap_changes(both, images, donors, masks, target=0)) < 0.95


def test_region_share_is_undefined_without_faces_on_which_both_changes_are():
    assert np.isnan(region_share(np.array([np.nan, 1.0]), np.array([2.0, np.nan])))
    assert np.isnan(region_share(np.zeros(2), np.zeros(2)))  # a model that reads neither
    assert region_share(np.array([3.0, np.nan]), np.array([1.0, 5.0])) == pytest.approx(0.75)  # the defined face only


def test_randomisation_correlation_ranks_magnitudes_unless_asked_for_signs():
    maps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(randomisation_correlation(maps, -maps), 1.0, atol=1e-9)  # same |map|
    np.testing.assert_allclose(randomisation_correlation(maps, -maps, signed=True), -1.0, atol=1e-9)
    np.testing.assert_allclose(randomisation_correlation(maps, maps, signed=True), 1.0, atol=1e-9)

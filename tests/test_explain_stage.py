from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from psyface.config import load_section
from psyface.dataset.layout import Masks, load_dataset
from psyface.errors import PsyfaceError
from psyface.explain.methods import METHODS, MethodOptions
from psyface.explain.stage import (
    ExplainParams,
    attribution_passes,
    check_params,
    explain_test_set,
    faces_to_explain,
)
from psyface.model import ModelSpec
from psyface.prepare import prepare
from psyface.split import SplitParams, assign_splits
from tests.explain_models import tiny_backbone_net, tiny_vgg

FAST = ExplainParams(
    methods=list(METHODS),  # every method, the ones off by default included
    options=MethodOptions(ig_steps=4, occlusion_window=16, occlusion_stride=16, cam_layers={"hirescam": "conv2_1"}),
    max_images={"integrated_gradients": 2, "occlusion": 2, "smoothgrad": 2},
    raw_maps_images=3,
    perturbation_images=2,
    perturbation_steps=4,
    sanity_images=2,
    n_boot=200,
)


@pytest.fixture(scope="module")
def explained(synthetic_data, tmp_path_factory):
    """The stage's core on the small synthetic set, with human attention = the mouth for `happy`."""
    dataset = load_dataset(synthetic_data)
    table = dataset.read_ratings()
    prepared = prepare(dataset, assign_splits(table["id"], table["identity"], SplitParams()), size=32)
    mouth_bit = 1 << dataset.masks.regions.index("mouth")
    prepared.attention = ((prepared.masks & mouth_bit) != 0).astype(np.uint8)
    dataset = dataclasses.replace(dataset, human_attention=Masks(template="attention/{id}.png", regions=["happy"]))
    names = dataset.attribute_names
    spec = ModelSpec(attributes=names, image_size=32, target_mean=[4.0] * len(names), target_std=[1.0] * len(names))
    test = faces_to_explain(dataset, prepared, names)
    figures = tmp_path_factory.mktemp("figures")
    torch.manual_seed(0)
    metrics, raw = explain_test_set(tiny_vgg(n_outputs=len(names)), spec, test, FAST, figures)
    return test, metrics, raw, figures


def test_every_method_is_scored_on_every_attribute_with_regions(explained):
    test, metrics, _, _ = explained
    with_regions = {"happy", "trustworthy", "dominant", "attractive", "age", "warm"}
    assert set(test.region_masks) == with_regions  # `control` has no facial signal: nothing to find
    for method in FAST.methods:
        result = metrics[method]
        assert set(result["localisation"]) == with_regions
        people = len(set(test.groups[: result["images"]]))
        for scores in result["localisation"].values():
            assert 0 < scores["chance"] < 1
            for score in ("relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game"):
                if people < 2:  # the bootstrap resamples people: one person has no interval
                    assert scores[f"{score}_ci_low"] is None and scores[f"{score}_ci_high"] is None
                    continue
                assert 0 <= scores[f"{score}_ci_low"] <= scores[score] <= scores[f"{score}_ci_high"] <= 1
        for kind in ("deletion", "insertion"):
            assert result[kind]["gain"] == pytest.approx(result[kind]["auc"] - result[kind]["auc_random"])
        randomisation = result["randomisation"]
        assert list(randomisation["cascade"]) == ["head", "block3", "block2", "block1"]
        assert randomisation["rank_correlation"] == randomisation["cascade"]["block1"]  # the end of the cascade
        assert randomisation["passed"] == (randomisation["rank_correlation"] < FAST.sanity_threshold)
    assert "grid_ceiling" in metrics["gradcam"]["localisation"]["happy"]
    assert "grid_ceiling" not in metrics["integrated_gradients"]["localisation"]["happy"]
    for scores in metrics["gradcam"]["localisation"].values():  # the whole mask on the grid: above chance, under the ceiling
        assert scores["chance"] < scores["covering_score"] <= scores["grid_ceiling"]
    assert "covering_score" not in metrics["integrated_gradients"]["localisation"]["happy"]
    # each CAM method is scored on its own layer's grid: HiResCAM at conv2_1 (16x16 at 32 px), the rest at the last
    assert (metrics["hirescam"]["layer"], metrics["hirescam"]["grid"]) == ("conv2_1", [16, 16])
    assert (metrics["gradcam"]["layer"], metrics["gradcam"]["grid"]) == ("last", [8, 8])
    assert metrics["gradcam"]["images"] == len(test.ids) and metrics["occlusion"]["images"] == 2
    cams = ["gradcam", "hirescam", "gradcam_plusplus", "layercam"]  # one pass, timed together
    assert all(metrics[method]["shared_pass"] == cams for method in cams) and "shared_pass" not in metrics["lrp"]
    assert len({metrics[method]["seconds_per_image"] for method in cams}) == 1
    completeness = metrics["integrated_gradients"]["completeness"]  # IG's maps sum to f(x) - f(baseline)
    assert completeness["steps"] == 4 and 0 <= completeness["median_relative_gap"] <= completeness["max_relative_gap"]
    assert completeness["passed"] == (completeness["median_relative_gap"] <= FAST.ig_max_relative_gap)
    json.dumps(metrics, allow_nan=False)  # valid JSON for DVC: undefined numbers are null, not NaN


def test_a_cam_layer_the_network_lacks_costs_only_that_method(explained, synthetic_data, tmp_path):
    """HiResCAM's own conv2_1 does not exist in a non-VGG backbone: Grad-CAM, which shares its pass, still runs."""
    test = explained[0]
    names = load_dataset(synthetic_data).attribute_names
    spec = ModelSpec(attributes=names, image_size=32, target_mean=[4.0] * len(names), target_std=[1.0] * len(names))
    params = dataclasses.replace(FAST, methods=["gradcam", "hirescam"], max_images={}, region_swap_images=4)
    metrics, _ = explain_test_set(tiny_backbone_net(n_outputs=len(names)), spec, test, params, tmp_path)
    assert metrics["hirescam"]["available"] is False and "needs a VGG architecture" in metrics["hirescam"]["reason"]
    assert metrics["gradcam"]["images"] == len(test.ids) and "shared_pass" not in metrics["gradcam"]
    assert metrics["gradcam"]["localisation"]["happy"]["relevance_mass_accuracy"] is not None


def test_how_local_the_model_itself_is_is_measured_by_swapping_parts_between_faces(explained):
    test, metrics, _, _ = explained
    shares = metrics["region_swap"]
    assert set(shares) == set(test.region_masks)
    for name, entry in shares.items():
        assert entry["images"] == min(FAST.region_swap_images, len(test.ids))
        assert 0 < entry["region_change"] and 0 < entry["rest_change"]  # a random network reads everything
        assert entry["region_share"] == pytest.approx(entry["region_change"] / (entry["region_change"] + entry["rest_change"]))
        assert metrics["verdict"][name]["model_region_share"] == entry["region_share"]
    assert metrics["verdict"]["control"]["model_region_share"] is None  # no region to swap


def test_an_untrained_model_predicts_nothing_so_no_map_is_trusted(explained):
    """Random weights: test r is noise for every attribute, and `control` has no regions at all."""
    test, metrics, _, _ = explained
    assert set(metrics["verdict"]) == set(metrics["test_r"]) == {*test.region_masks, "control"}
    for name, verdict in metrics["verdict"].items():
        if verdict["test_r"] is not None and verdict["test_r"] >= FAST.min_test_r:
            continue  # chance can make a random network correlate with a rating on 16 faces
        assert verdict["trusted_method"] is None and verdict["trusted"] is False
        assert "its maps explain noise" in verdict["verdict"] and verdict["ground_truth"] == "not checked"
    assert metrics["verdict"]["control"]["best_method"] is None  # nothing to localise


def test_human_attention_masks_are_scored_like_region_masks(explained):
    _, metrics, _, _ = explained
    for method in FAST.methods:
        assert metrics[method]["human_attention"] == {"happy": metrics[method]["localisation"]["happy"]}


def test_figures_and_a_float16_subset_of_raw_maps(explained):
    test, _, raw, figures = explained
    names = {path.name for path in figures.iterdir()}
    assert names == {"mean_heatmaps.png", "deletion_insertion.png", "randomisation.png",
                     *(f"extremes_{m}.png" for m in FAST.methods)}
    assert raw["gradcam"].shape == (3, 7, 32, 32) and raw["gradcam"].dtype == np.float16
    assert raw["occlusion"].shape[0] == 2 and list(raw["ids"]) == test.ids[:3]
    assert np.abs(raw["gradcam"]).max() == pytest.approx(1.0, abs=1e-3)  # scaled per map; `_scale` restores


def test_metrics_flatten_to_mlflow_names(explained):
    _, metrics, _, _ = explained
    from psyface.tracking import metric_values

    flat = metric_values(metrics, "explain")
    assert flat["explain.gradcam.localisation.happy.relevance_mass_accuracy"] == metrics["gradcam"]["localisation"]["happy"]["relevance_mass_accuracy"]
    assert flat["explain.aligned"] == 1.0
    assert flat["explain.verdict.control.trusted"] == 0.0
    assert flat["explain.integrated_gradients.randomisation.cascade.head"] == metrics["integrated_gradients"]["randomisation"]["cascade"]["head"]
    assert all(isinstance(value, float) for value in flat.values())


def test_the_cam_methods_with_equal_budgets_share_a_pass_and_the_others_have_their_own():
    passes = attribution_passes({"gradcam": 300, "lrp": 32, "hirescam": 300, "layercam": 32, "gradcam_plusplus": 300,
                                 "occlusion": 32})
    assert passes == [(300, ["gradcam", "hirescam", "gradcam_plusplus"]), (32, ["lrp"]), (32, ["layercam"]), (32, ["occlusion"])]


def test_the_repository_params_parse_and_unknown_budgets_are_refused(tmp_path):
    params = load_section("explain", ExplainParams)
    check_params(params)
    assert params.methods == ["gradcam", "hirescam", "gradcam_plusplus", "layercam", "lrp"]
    with pytest.raises(PsyfaceError, match="unknown methods \\['saliency'\\]"):
        check_params(dataclasses.replace(params, max_images={"saliency": 3}))
    assert params.options.cam_layers == {"hirescam": "conv2_1"} and params.options.gradcam_layer == "conv3_3"
    with pytest.raises(PsyfaceError, match="cam_layers names \\['lrp'\\], which are not CAM methods"):
        check_params(dataclasses.replace(params, options=dataclasses.replace(params.options, cam_layers={"lrp": "conv2_1"})))
    with pytest.raises(PsyfaceError, match="names \\['lrp'\\] more than once"):
        check_params(dataclasses.replace(params, methods=["lrp", "gradcam", "lrp"]))

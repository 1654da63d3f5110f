from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from psyface.config import load_section
from psyface.dataset.layout import Masks, load_dataset
from psyface.errors import PsyfaceError
from psyface.explain.methods import MethodOptions
from psyface.explain.stage import (
    ExplainParams,
    check_params,
    explain_test_set,
    faces_to_explain,
)
from psyface.model import ModelSpec
from psyface.prepare import prepare
from psyface.split import SplitParams, assign_splits
from tests.explain_models import tiny_vgg

FAST = ExplainParams(
    options=MethodOptions(ig_steps=4, occlusion_window=16, occlusion_stride=16),
    max_images={"integrated_gradients": 2, "occlusion": 2, "smoothgrad": 2},
    raw_maps_images=3,
    deletion_images=2,
    deletion_steps=4,
    sanity_images=2,
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
        for scores in result["localisation"].values():
            assert 0 < scores["chance"] < 1
            assert 0 <= scores["relevance_mass_accuracy"] <= 1
        assert result["deletion"]["gain"] == pytest.approx(result["deletion"]["auc"] - result["deletion"]["auc_random"])
        assert -1 <= result["randomisation"]["rank_correlation"] <= 1
    assert metrics["gradcam"]["images"] == len(test.ids) and metrics["occlusion"]["images"] == 2
    assert set(metrics["targets"]) == {"gradcam_relevance_mass_accuracy", "gradcam_randomisation", "integrated_gradients_randomisation"}
    json.dumps(metrics, allow_nan=False)  # valid JSON for DVC: undefined numbers are null, not NaN


def test_human_attention_masks_are_scored_like_region_masks(explained):
    _, metrics, _, _ = explained
    for method in FAST.methods:
        assert metrics[method]["human_attention"] == {"happy": metrics[method]["localisation"]["happy"]}


def test_figures_and_a_float16_subset_of_raw_maps(explained):
    test, _, raw, figures = explained
    names = {path.name for path in figures.iterdir()}
    assert names == {"mean_heatmaps.png", "deletion.png", *(f"extremes_{m}.png" for m in FAST.methods)}
    assert raw["gradcam"].shape == (3, 7, 32, 32) and raw["gradcam"].dtype == np.float16
    assert raw["occlusion"].shape[0] == 2 and list(raw["ids"]) == test.ids[:3]
    assert np.abs(raw["gradcam"]).max() == pytest.approx(1.0, abs=1e-3)  # scaled per map; `_scale` restores


def test_metrics_flatten_to_mlflow_names(explained):
    _, metrics, _, _ = explained
    from psyface.tracking import metric_values

    flat = metric_values(metrics, "explain")
    assert flat["explain.gradcam.localisation.happy.relevance_mass_accuracy"] == metrics["gradcam"]["localisation"]["happy"]["relevance_mass_accuracy"]
    assert flat["explain.aligned"] == 1.0
    assert all(isinstance(value, float) for value in flat.values())


def test_the_repository_params_parse_and_unknown_budgets_are_refused(tmp_path):
    params = load_section("explain", ExplainParams)
    check_params(params)
    assert params.methods == ["gradcam", "integrated_gradients", "lrp", "occlusion"]
    with pytest.raises(PsyfaceError, match="unknown methods \\['saliency'\\]"):
        check_params(dataclasses.replace(params, max_images={"saliency": 3}))

"""The verdict per attribute: which method a researcher can trust, and why the others cannot be.

End to end on a tiny model that sees only the mouth (the mouth must come out as the trusted region,
and an attribute it does not predict must get no method), then the rules one by one on hand-made
method results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from psyface.explain.methods import MethodOptions
from psyface.explain.stage import (
    ExplainParams,
    FacesToExplain,
    attribute_verdict,
    explain_test_set,
    ground_truth_status,
    read_ground_truth,
)
from psyface.model import ModelSpec, to_input
from tests.explain_models import SIZE, box, weighted_region_model

MOUTH = box(20, 28, 8, 24)
PARAMS = ExplainParams(
    methods=["gradcam", "integrated_gradients"], options=MethodOptions(ig_steps=4, gradcam_layer="last"), max_images={},
    n_top=1, raw_maps_images=2, perturbation_images=2, perturbation_steps=4, sanity_images=2, n_boot=200,
)


@pytest.fixture(scope="module")
def mouth_run(tmp_path_factory) -> dict:
    """12 faces of 6 people: `happy` is rated as the model predicts it, `control` is rated at random."""
    net = weighted_region_model(MOUTH, n_outputs=2)
    images = (torch.rand(12, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    spec = ModelSpec(attributes=["happy", "control"], image_size=SIZE, target_mean=[0.0, 0.0], target_std=[1.0, 1.0])
    with torch.no_grad():
        predicted = net(to_input(images, "cpu", spec.input_mean, spec.input_std)).numpy()
    ratings = np.stack([predicted[:, 0], np.random.default_rng(0).normal(size=12)], axis=1)
    test = FacesToExplain(ids=[f"f{i}" for i in range(12)], images=images, ratings=ratings, groups=np.arange(12) // 2,
                          region_masks={"happy": np.repeat(MOUTH.numpy()[None], 12, axis=0)}, attention_masks={},
                          aligned=True)
    metrics, _ = explain_test_set(net, spec, test, PARAMS, tmp_path_factory.mktemp("figures"))
    return metrics


def test_a_model_that_sees_only_the_mouth_gets_a_trusted_method_on_the_mouth(mouth_run):
    verdict = mouth_run["verdict"]["happy"]
    assert mouth_run["test_r"]["happy"] == pytest.approx(1.0)
    assert verdict["trusted"] and verdict["trusted_method"] == "integrated_gradients"
    assert verdict["relevance_mass_accuracy_ci_low"] > 0.95 > verdict["chance"] == pytest.approx(MOUTH.float().mean())
    assert verdict["relevance_mass_accuracy_ci_low"] <= verdict["relevance_mass_accuracy"] <= verdict["relevance_mass_accuracy_ci_high"]
    # Grad-CAM averages the gradient over its layer, where every pixel is active: it cannot find the mouth
    assert verdict["failing"]["gradcam"].startswith("not above chance")
    assert verdict["ground_truth"] == "not checked" and "ground truth not checked" in verdict["verdict"]
    ig = mouth_run["integrated_gradients"]
    assert ig["randomisation"]["passed"]
    for kind in ("deletion", "insertion"):  # a faithful map beats the random order both ways
        assert ig[kind]["gain"] > 0.2 * ig[kind]["auc_random"]


def test_an_attribute_the_model_does_not_predict_gets_no_trusted_method(mouth_run):
    verdict = mouth_run["verdict"]["control"]
    assert verdict["test_r"] < PARAMS.min_test_r and not verdict["predicted"]
    assert verdict["trusted_method"] is None and "its maps explain noise" in verdict["verdict"]


def method_result(rma: float, low: float, passed: bool = True, ceiling: float | None = None) -> dict:
    scores = {"relevance_mass_accuracy": rma, "relevance_mass_accuracy_ci_low": low,
              "relevance_mass_accuracy_ci_high": rma + (rma - low), "chance": 0.1, "images": 50,
              **({"grid_ceiling": ceiling} if ceiling is not None else {})}
    return {"localisation": {"happy": scores}, "grid": [4, 4],
            "randomisation": {"passed": passed, "rank_correlation": 0.1 if passed else 0.6}}


METHODS = {
    "gradcam": method_result(0.35, 0.30, ceiling=0.4),  # localises, but its 4x4 grid cannot reach 0.7
    "integrated_gradients": method_result(0.8, 0.7, passed=False),  # the best localisation, of the input
    "occlusion": method_result(0.5, 0.4),
    "lrp": method_result(0.12, 0.08),  # its interval reaches down to chance
    "saliency": {"available": False, "reason": "not for transformers"},
}


def test_the_best_method_that_passes_every_check_is_trusted_and_each_other_names_its_reason():
    verdict = attribute_verdict("happy", METHODS, 0.9, True, "valid", ExplainParams())
    assert verdict["trusted_method"] == verdict["best_method"] == "occlusion"
    assert (verdict["relevance_mass_accuracy"], verdict["relevance_mass_accuracy_ci_low"]) == (0.5, 0.4)
    failing = verdict["failing"]
    assert set(failing) == {"gradcam", "integrated_gradients", "lrp", "saliency"}
    assert failing["gradcam"].startswith("grid ceiling (0.40 < target 0.7") and "4x4 grid" in failing["gradcam"]
    assert failing["integrated_gradients"].startswith("fails randomisation (rank correlation 0.60 >= 0.2")
    assert failing["lrp"].startswith("not above chance (RMA 95% CI lower bound 0.08 <= chance 0.10")
    assert failing["saliency"] == "not available (not for transformers)"


def test_the_model_region_share_is_carried_into_the_verdict_of_a_predicted_attribute():
    verdict = attribute_verdict("happy", METHODS, 0.9, True, "valid", ExplainParams(), model_region_share=0.71)
    assert verdict["model_region_share"] == 0.71 and verdict["trusted_method"] == "occlusion"
    assert verdict["verdict"].endswith("; the model's own region share (parts swapped between faces) is 0.71")
    noise = attribute_verdict("happy", METHODS, 0.1, True, "valid", ExplainParams(), model_region_share=0.71)
    assert "region share" not in noise["verdict"]  # an unpredicted attribute's share is noise too
    assert attribute_verdict("happy", METHODS, 0.9, True, "valid", ExplainParams())["model_region_share"] is None


def test_an_invalid_ground_truth_reports_the_localisation_without_trusting_it(tmp_path: Path):
    path = tmp_path / "ground_truth.json"
    path.write_text('{"attributes": {"happy": {"valid": false, "outside_r": 0.41, "inside_r": 0.2}, "age": {"valid": true}}}')
    ground_truth = read_ground_truth(path)
    status = ground_truth_status(ground_truth, "happy")
    assert status == "not valid (outside_r 0.41, inside_r 0.20)"
    assert ground_truth_status(ground_truth, "age") == "valid"
    assert ground_truth_status(ground_truth, "warm") == ground_truth_status(read_ground_truth(tmp_path / "absent.json"), "happy") == "not checked"
    verdict = attribute_verdict("happy", METHODS, 0.9, True, status, ExplainParams())
    assert verdict["best_method"] == "occlusion" and verdict["relevance_mass_accuracy"] == 0.5
    assert verdict["trusted_method"] is None and "ground truth is not valid (outside_r 0.41" in verdict["verdict"]


def test_no_trusted_method_without_region_masks_or_when_every_method_fails():
    params = ExplainParams()
    unmasked = attribute_verdict("happy", {"occlusion": {**METHODS["occlusion"], "localisation": {}}}, 0.9, False, "not checked", params)
    assert unmasked["trusted_method"] is None and "localisation not checked" in unmasked["verdict"]
    strict = dataclasses.replace(params, sanity_threshold=0.05)
    failing = {name: {**result, "randomisation": {"passed": False, "rank_correlation": 0.1}}
               for name, result in METHODS.items() if name != "saliency"}
    verdict = attribute_verdict("happy", failing, 0.9, True, "valid", strict)
    assert verdict["trusted_method"] is None and verdict["best_method"] is None
    assert verdict["verdict"] == "no method passes randomisation with localisation above chance"

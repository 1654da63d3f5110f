"""The ground truth the explanations are scored against: valid by construction, and checked on the data.

Two halves: the generator's construction (expressions never move an attribute's latents; every pixel
a latent can move lies inside its regions' masks, across the latent's whole range) and the
model-free check of the `ground_truth` stage on real generator output, which must pass on the
default data and must fail when a mask misses where the information is.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from psyface.artifacts import EXPLAIN_GROUND_TRUTH_FILE, PREPARED_DIR, save_prepared
from psyface.dataset import synth
from psyface.dataset.layout import load_dataset
from psyface.ground_truth import GroundTruthParams, check_ground_truth, main
from psyface.prepare import prepare
from tests.conftest import make_synthetic


def test_no_expression_moves_a_latent_any_attribute_is_made_of():
    rated = {latent for weights in synth.IMPRESSIONS.values() for latent in weights}
    moved = {latent for effects in synth.EXPRESSION_EFFECTS.values() for latent in effects}
    assert moved and rated.isdisjoint(moved)


def test_drawn_state_latents_are_independent_of_the_expression():
    """Mouth curvature and brow angle have the same distribution whatever the expression."""
    by_expression: dict[str, list[float]] = {name: [] for name in synth.EXPRESSIONS}
    for person in range(600):
        identity = synth.sample_identity(np.random.default_rng([5, person]))
        expression, face = synth.sample_face(identity, np.random.default_rng([5, person, 1]))
        by_expression[expression].append(face.latent("mouth_curve"))
    means = {name: np.mean(values) for name, values in by_expression.items()}
    assert max(means.values()) - min(means.values()) < 0.35  # SE of each mean ~.1; the old smile shifted it by 1.8


@pytest.mark.parametrize("region", ["mouth", "brows", "eyes"])
def test_every_pixel_a_region_latent_can_move_at_its_bounds_is_inside_the_mask(region):
    """Faces drawn at every corner of the region's latents' clip box differ from the middle face only
    inside the mask (which never depends on those latents)."""
    bit = 1 << synth.REGIONS.index(region)
    latents = [name for name, regions in synth.LATENT_REGIONS.items() if regions == [region] and name in synth.CLIP]
    identity = synth.sample_identity(np.random.default_rng([4, 0]))
    _, face = synth.sample_face(identity, np.random.default_rng([4, 0, 1]))
    face.nuisance["noise_seed"] = 1
    image, masks, _ = synth.render(face, 64, 0.0)
    for corner in itertools.product(*(synth.CLIP[name] for name in latents)):
        extreme = copy.deepcopy(face)
        for name, value in zip(latents, corner, strict=True):
            (extreme.state if name in extreme.state else extreme.identity)[name] = value
        changed_image, changed_masks, _ = synth.render(extreme, 64, 0.0)
        assert np.array_equal(masks & bit, changed_masks & bit), "the mask must not depend on its own latents"
        changed = np.abs(image.astype(int) - changed_image).max(axis=-1) > 0
        assert changed.any() and not (changed & ((masks & bit) == 0)).any(), (region, corner)


def prepared_faces(data: Path):  # noqa: ANN201 - (spec, Prepared)
    """The data as the prepare stage packs it (64 px images, masks covering the resize's blend)."""
    spec = load_dataset(data)
    table = spec.read_ratings()
    return spec, prepare(spec, pd.DataFrame({"id": table["id"], "split": "train"}), 64)


@pytest.mark.slow
@pytest.mark.xdist_group("default_data")
def test_the_default_generator_passes_the_model_free_check(default_data):
    """On the default dataset, prepared as the pipeline does, a probe that cannot see an attribute's
    regions learns nothing about it, a probe that sees only them learns it, and the injected rater
    bias is visible outside the masks until it is partialled out."""
    spec, prepared = prepared_faces(default_data)
    result = check_ground_truth(spec, prepared, GroundTruthParams(n_boot=200))
    checked = result["attributes"]
    assert all(entry["valid"] for entry in checked.values()), {n: e["reason"] for n, e in checked.items()}
    for name, entry in checked.items():
        if entry["regions"]:
            assert entry["inside_r"] > 0.8, name
            assert entry["inside_r_ci"][0] <= entry["inside_r"] <= entry["inside_r_ci"][1]
    trust = checked["trustworthy"]
    assert trust["rating_biases"] == ["group"] and trust["outside_r"] > 0.1 > abs(trust["outside_r_without_biases"])


def test_a_mask_that_misses_the_information_is_not_valid(tmp_path, monkeypatch):
    """Declare `happy` to live in the eyes: the probe outside that mask sees the mouth and finds it."""
    data = make_synthetic(tmp_path / "data", n_identities=100, images_per_identity=2, size=64, bias_shift=0.0)
    raw = yaml.safe_load((data / "dataset.yaml").read_text())
    raw["attributes"] = {name: raw["attributes"][name] for name in ("happy", "warm")}
    raw["attributes"]["happy"]["regions"] = ["eyes"]
    (data / "dataset.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    spec, prepared = prepared_faces(data)
    checked = check_ground_truth(spec, prepared, GroundTruthParams(n_boot=200))["attributes"]
    assert not checked["happy"]["valid"] and checked["happy"]["outside_r"] > 0.3
    assert "outside the masks predict it" in checked["happy"]["reason"]
    assert abs(checked["warm"]["outside_r"]) < 0.2 and checked["warm"]["inside_r"] > 0.6  # a right mask, same 200 faces

    monkeypatch.chdir(tmp_path)  # the stage entry writes the same verdict as the stage output
    (tmp_path / "params.yaml").write_text("ground_truth:\n  n_boot: 200\n")
    save_prepared(prepared, tmp_path / PREPARED_DIR, spec.name)
    assert main([]) == 0
    written = json.loads((tmp_path / EXPLAIN_GROUND_TRUTH_FILE).read_text())
    assert written["attributes"]["happy"]["valid"] is False


def test_a_dataset_without_masks_says_so(tmp_path):
    data = make_synthetic(tmp_path / "data", n_identities=6)
    spec, prepared = prepared_faces(data)
    result = check_ground_truth(dataclasses.replace(spec, masks=None), dataclasses.replace(prepared, masks=None),
                                GroundTruthParams())
    assert result["available"] is False and "no region masks" in result["reason"]

import copy
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from psyface.dataset import synth
from psyface.dataset.layout import load_dataset
from tests.conftest import make_synthetic, run_cli

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_parameters_give_byte_identical_files(tmp_path):
    first = make_synthetic(tmp_path / "a", n_identities=6)
    second = make_synthetic(tmp_path / "b", n_identities=6)
    assert tree_digest(first) == tree_digest(second)
    other_seed = make_synthetic(tmp_path / "c", n_identities=6, seed=1)
    assert tree_digest(first) != tree_digest(other_seed)


@pytest.mark.slow
@pytest.mark.xdist_group("default_data")
def test_default_dataset_matches_committed_data_dvc(default_data, tmp_path):
    """A fresh machine regenerates exactly the data that data.dvc records (so `dvc status` is clean)."""
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    shutil.copytree(default_data, tmp_path / "data")
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    fresh = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert (fresh["md5"], fresh["nfiles"]) == (committed["md5"], committed["nfiles"])


def perturbed(face: synth.Face, latent: str, delta: float) -> synth.Face:
    changed = copy.deepcopy(face)
    target = changed.state if latent in changed.state else changed.identity
    middle = sum(synth.CLIP[latent]) / 2 if latent in synth.CLIP else 0.0
    target[latent] += -delta if target[latent] > middle else delta  # towards the middle of its range: never clipped
    return changed


@pytest.mark.parametrize("attribute", [a for a, spec in synth.ATTRIBUTES.items() if spec.regions])
def test_attribute_depends_only_on_its_regions(attribute):
    bits = sum(1 << synth.REGIONS.index(r) for r in synth.ATTRIBUTES[attribute].regions)
    own = set(synth.IMPRESSIONS[attribute])
    for trial in range(8):
        identity = synth.sample_identity(np.random.default_rng([9, trial]))
        _, face = synth.sample_face(identity, np.random.default_rng([9, trial, 1]))
        image, masks, _ = synth.render(face, 64, 3.0)
        for latent, regions in synth.LATENT_REGIONS.items():
            other = perturbed(face, latent, 1.2)
            changed_image, changed_masks, _ = synth.render(other, 64, 3.0)
            changed = np.abs(image.astype(int) - changed_image).max(axis=-1) > 0
            rating_moved = synth.impression(other)[attribute] != synth.impression(face)[attribute]
            if latent in own:
                # Perturbing the attribute's region changes its rating, and pixels only inside its mask.
                assert rating_moved and changed.any()
                assert not (changed & (((masks | changed_masks) & bits) == 0)).any(), latent
            elif set(regions).isdisjoint(synth.ATTRIBUTES[attribute].regions):
                # Perturbing elsewhere leaves the rating untouched.
                assert not rating_moved, latent


def test_control_attribute_has_no_facial_signal():
    identity = synth.sample_identity(np.random.default_rng([3, 0]))
    _, face = synth.sample_face(identity, np.random.default_rng([3, 0, 1]))
    image, _, _ = synth.render(face, 64, 3.0)
    hidden = perturbed(face, "hidden", 2.0)
    assert np.array_equal(image, synth.render(hidden, 64, 3.0)[0])
    assert synth.impression(hidden)["control"] != synth.impression(face)["control"]


def test_injected_bias_is_in_the_table_and_absent_from_the_control(tmp_path):
    biased = pd.read_csv(make_synthetic(tmp_path / "biased", n_identities=40, bias_shift=0.6) / "ratings.csv")
    fair = pd.read_csv(make_synthetic(tmp_path / "fair", n_identities=40, bias_shift=0.0) / "ratings.csv")
    group_b = biased["group"] == "B"
    assert group_b.sum() > 10 and (~group_b).sum() > 10
    shift = biased["trustworthy"] - fair["trustworthy"]
    assert shift[~group_b].abs().max() == 0
    assert shift[group_b].mean() < -0.5  # 0.6 rater-SD units x 1.2 scale points, less clipping
    unbiased = [c for c in synth.ATTRIBUTES if c != "trustworthy"]
    pd.testing.assert_frame_equal(biased[unbiased], fair[unbiased])


def test_dataset_declares_layout_reliability_and_ground_truth(synthetic_data):
    spec = load_dataset(synthetic_data)
    table = spec.read_ratings()
    assert list(spec.attributes) == list(synth.ATTRIBUTES)
    assert all(0.5 < spec.reliability[a] <= 1 for a in spec.attributes)
    assert table["expression"].isin(synth.EXPRESSIONS).all()
    assert table[list(spec.attributes)].apply(lambda c: c.between(1, 7).all()).all()
    marks = pd.read_csv(synthetic_data / spec.landmarks.file)
    assert spec.landmarks.n_points >= 30 and marks.shape == (len(table), 1 + 2 * spec.landmarks.n_points)
    first = table["id"].iloc[0]
    assert spec.image_path(first).is_file() and spec.mask_path(first).is_file()


def test_cli_refuses_to_overwrite_and_reports_bad_options(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    result = run_cli("synth", "--out", str(tmp_path / "data"), "--n-identities", "2")
    assert result.returncode == 2 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"
    result = run_cli("synth", "--out", str(tmp_path / "x"), "--bias-attribute", "nope")
    assert result.returncode == 2 and "--bias-attribute" in result.stderr
    shutil.rmtree(tmp_path / "data")

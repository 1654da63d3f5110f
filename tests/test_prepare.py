import json

import numpy as np
import pandas as pd
import pytest

from psyface.artifacts import PREPARED_DIR, load_prepared, save_prepared
from psyface.dataset.layout import load_dataset
from psyface.errors import PsyfaceError
from psyface.images import load_image
from psyface.prepare import prepare
from psyface.split import SplitParams, assign_splits
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def prepared(synthetic_data):
    spec = load_dataset(synthetic_data)
    table = spec.read_ratings()
    assignment = assign_splits(table["id"], table["identity"], SplitParams())
    return spec, prepare(spec, assignment, size=32)


def test_arrays_are_aligned_with_table_rows(prepared):
    spec, result = prepared
    assert result.images.shape == (len(result.table), 32, 32, 3) and result.images.dtype == np.uint8
    for row in (0, len(result.table) - 1):
        image_id = result.table["id"].iloc[row]
        assert np.array_equal(result.images[row], load_image(spec.image_path(image_id), 32))
    assert set(result.table.columns) >= {"id", "split", *spec.attributes, *spec.sensitive_features}
    assert sorted(np.concatenate([result.split(s) for s in ("train", "val", "test")])) == list(range(len(result.table)))


def test_masks_keep_their_bits(prepared):
    spec, result = prepared
    assert result.masks is not None and result.masks.shape == result.images.shape[:3]
    used = np.bitwise_or.reduce(result.masks.reshape(-1))
    assert used == (1 << len(spec.masks.regions)) - 1  # every region bit survives resizing
    mouth = spec.attribute_mask(result.masks, "happy")
    assert 0.005 < mouth.mean() < 0.2


def test_save_and_load_round_trip_leaves_no_temporary_files(prepared, tmp_path):
    _, result = prepared
    folder = tmp_path / "prepared"
    save_prepared(result, folder, "tiny")
    loaded = load_prepared(folder)
    assert np.array_equal(loaded.images, result.images) and np.array_equal(loaded.masks, result.masks)
    pd.testing.assert_frame_equal(loaded.table, result.table, check_dtype=False)
    assert json.loads((folder / "meta.json").read_text())["counts"]["test"] == len(result.split("test"))
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_incomplete_output_is_never_taken_as_complete(tmp_path):
    (tmp_path / "prepared").mkdir()
    np.save(tmp_path / "prepared" / "images.npy", np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(PsyfaceError, match="incomplete"):
        load_prepared(tmp_path / "prepared")


def test_stage_without_split_says_what_to_run(tmp_path, synthetic_data):
    (tmp_path / "data").symlink_to(synthetic_data)
    result = run_cli("prepare", cwd=tmp_path)
    assert result.returncode == 2 and "dvc repro split" in result.stderr
    assert not (tmp_path / PREPARED_DIR).exists()

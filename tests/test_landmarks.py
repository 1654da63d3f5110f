"""The landmarks stage: normalisation invariances and honest reporting of unusable rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from psyface.dataset.layout import Attribute, DatasetSpec, Landmarks
from psyface.errors import PsyfaceError
from psyface.landmarks import LandmarksParams, build, read_coordinates
from psyface.shapes import coordinate_columns, normalise_shapes, procrustes_mean


def similarity(points: np.ndarray, degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return scale * points @ rotation.T + np.asarray(shift)


@pytest.fixture
def shapes() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 12, 2)) * 20 + 64


def test_normalised_shape_is_invariant_to_shift_scale_and_roll(shapes: np.ndarray) -> None:
    reference = shapes[0]
    moved = np.stack([similarity(s, degrees, 2.5, (31.0, -12.0)) for s, degrees in zip(shapes, [-30, -4, 0, 9, 75])])
    original = normalise_shapes(shapes, reference)
    np.testing.assert_allclose(normalise_shapes(moved, reference), original, atol=1e-9)
    np.testing.assert_allclose(original.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt((original**2).sum(axis=2).mean(axis=1)), 1.0)


def test_pose_from_anchors_leaves_an_expression_displacement_where_it_is(shapes: np.ndarray) -> None:
    """Aligned on anchors 0-5, moving landmark 9 moves only landmark 9, in any pose."""
    anchors, reference = np.arange(6), shapes[0]
    smiling = shapes[1].copy()
    smiling[9] += (3.0, -4.0)
    posed = similarity(smiling, 20, 0.7, (5.0, 9.0))
    neutral_out, smiling_out = normalise_shapes(np.stack([shapes[1], posed]), reference, anchors)
    moved = np.abs(smiling_out - neutral_out).max(axis=1) > 1e-9
    assert moved.tolist() == [k == 9 for k in range(12)]
    everything = normalise_shapes(np.stack([shapes[1], posed]), reference)  # all points as anchors
    assert (np.abs(everything[1] - everything[0]).max(axis=1) > 1e-3).sum() == 12


def test_normalisation_keeps_shape_differences(shapes: np.ndarray) -> None:
    """A mirrored face is a different shape: rotation may not undo a reflection."""
    mirrored = shapes[1] * np.array([-1.0, 1.0])
    pair = normalise_shapes(np.stack([shapes[1], mirrored]), shapes[0])
    assert np.abs(pair[0] - pair[1]).max() > 0.1


def test_procrustes_mean_recovers_the_upright_template(shapes: np.ndarray) -> None:
    template = shapes[0]
    rng = np.random.default_rng(1)
    posed = np.stack([
        similarity(template + rng.normal(scale=0.2, size=template.shape), rng.uniform(-5, 5), rng.uniform(0.8, 1.2),
                   tuple(rng.uniform(-10, 10, size=2)))
        for _ in range(40)
    ])
    mean = procrustes_mean(posed)
    expected = normalise_shapes(template[None], template)[0]  # centred, unit size, unrotated
    np.testing.assert_allclose(mean, expected, atol=0.02)


def tiny_spec(tmp_path, n_points: int) -> DatasetSpec:
    spec = DatasetSpec(
        name="tiny",
        attributes={"happy": Attribute((1.0, 7.0))},
        labels={"expression": ["neutral", "happy"]},
        landmarks=Landmarks(n_points=n_points, regions={"all": list(range(n_points))}),
        root=tmp_path,
    )
    spec.write(tmp_path)
    return spec


def test_unusable_rows_are_reported_with_their_reason(tmp_path, shapes: np.ndarray) -> None:
    n_points = shapes.shape[1]
    spec = tiny_spec(tmp_path, n_points)
    ids = [f"f{k}" for k in range(9)]
    pd.DataFrame({"id": ids, "happy": 4.0, "expression": ["happy"] * 7 + ["grumpy", "neutral"]}).to_csv(
        spec.ratings_path, index=False
    )
    rows = np.concatenate([shapes, shapes]).reshape(10, -1)[:9].astype(object)
    rows[1, 3] = np.nan  # missing y1
    rows[2, 0] = "abc"  # malformed x0
    rows[3, :] = 5.0  # degenerate: every point at (5, 5)
    table = pd.DataFrame(rows, columns=coordinate_columns(n_points))
    table.insert(0, "id", ids)
    table.loc[len(table)] = ["f4", *table.iloc[4, 1:]]  # duplicate id
    table.loc[len(table)] = ["stray", *table.iloc[0, 1:]]  # not in the ratings
    table = table[table["id"] != "f5"]  # no landmarks for f5
    split = pd.DataFrame({"id": [i for i in ids if i != "f6"], "split": "train"})  # f6 unsplit

    result, problems = build(spec, table, split, LandmarksParams(align_regions=[]))  # the table declares no regions

    reasons = dict(zip(problems["id"], problems["problem"], strict=True))
    assert reasons["f1"].startswith("missing coordinate(s) y1")
    assert reasons["f2"].startswith("malformed coordinate(s) x0")
    assert reasons["f3"].startswith("degenerate")
    assert reasons["f4"].startswith("duplicate id")
    assert reasons["f5"] == "no landmarks row"
    assert reasons["f6"].startswith("no split")
    assert "not one of" in reasons["f7"]
    assert "absent from the ratings" in reasons["stray"]
    assert sorted(result.ids) == ["f0", "f8"]
    assert result.points.shape == (2, n_points, 2)
    assert list(result.labels) == ["happy", "neutral"]


def test_a_table_without_the_declared_points_is_a_clear_error(shapes: np.ndarray) -> None:
    table = pd.DataFrame(shapes.reshape(5, -1), columns=coordinate_columns(12)).assign(id=list("abcde"))
    with pytest.raises(PsyfaceError, match=r"lacks column\(s\) \['x12', 'y12'"):
        read_coordinates(table, "id", 13)

"""Split-half reliability from a long per-rating table: the analytic value is recovered, means match."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from psyface.dataset.reliability import (
    LongColumns,
    clean_long,
    face_means,
    mean_disagreements,
    padded,
    read_reliability_table,
    reliabilities,
    spearman_brown,
    split_half,
)
from psyface.errors import PsyfaceError


def constructed(faces: int, raters: int, true_sd: float, noise_sd: float, seed: int = 0) -> pd.DataFrame:
    """A long table: every face's true score plus independent rater noise, `raters` ratings per face."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, true_sd, faces)
    ratings = true[:, None] + rng.normal(0.0, noise_sd, (faces, raters))
    return pd.DataFrame({"id": np.repeat([f"f{i}" for i in range(faces)], raters),
                         "rater": np.tile([f"r{j}" for j in range(raters)], faces),
                         "attribute": "trust", "rating": ratings.ravel()})


@pytest.mark.parametrize(("raters", "true_sd", "noise_sd"), [(10, 1.0, 2.0), (6, 1.0, 1.0), (20, 0.5, 2.0)])
def test_split_half_matches_the_analytic_reliability(raters: int, true_sd: float, noise_sd: float) -> None:
    """Reliability of the mean of k ratings: k s_t^2 / (k s_t^2 + s_e^2), Spearman-Brown of one rating's."""
    long = constructed(4000, raters, true_sd, noise_sd)
    result = split_half(long["id"].to_numpy(), long["rating"].to_numpy(), splits=100, seed=1)
    single = true_sd**2 / (true_sd**2 + noise_sd**2)
    analytic = raters * true_sd**2 / (raters * true_sd**2 + noise_sd**2)
    assert analytic == pytest.approx(spearman_brown(single, raters))
    assert result.reliability == pytest.approx(analytic, abs=0.015)
    assert result.low <= result.reliability <= result.high and 0 < result.sd < 0.05
    assert (result.faces, result.too_few, result.ratings_per_face) == (4000, 0, (raters, raters, float(raters)))


def test_faces_with_too_few_ratings_are_counted_and_uneven_counts_work() -> None:
    long = constructed(600, 8, 1.0, 1.0, seed=2)
    rng = np.random.default_rng(3)
    long = long[rng.random(len(long)) > 0.3]  # uneven numbers of ratings per face
    single = pd.DataFrame({"id": ["lonely1", "lonely2"], "rater": "r0", "attribute": "trust", "rating": [1.0, 2.0]})
    long = pd.concat([long, single], ignore_index=True)
    result = split_half(long["id"].to_numpy(), long["rating"].to_numpy(), splits=50, seed=0)
    assert result.too_few >= 2 and result.faces + result.too_few == long["id"].nunique()
    assert result.ratings_per_face[0] >= 2 and result.ratings_per_face[1] <= 8
    assert 0.6 < result.reliability < 0.95  # about k=5.6: 0.85 expected
    again = split_half(long["id"].to_numpy(), long["rating"].to_numpy(), splits=50, seed=0)
    assert again == result  # seeded


def test_padding_keeps_every_rating_of_every_face() -> None:
    array, counts = padded(np.array(["b", "a", "b", "b", "a"]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert counts.tolist() == [2, 3]  # a, b
    assert np.array_equal(array[0, :2], [2.0, 5.0]) and np.isnan(array[0, 2])
    assert np.array_equal(array[1], [1.0, 3.0, 4.0])


def test_means_recomputed_from_the_long_table_equal_the_given_means() -> None:
    long = constructed(50, 7, 1.0, 1.0, seed=4)
    long = pd.concat([long, long.assign(attribute="happy", rating=long["rating"] + 1)], ignore_index=True)
    given = long.groupby(["id", "attribute"])["rating"].mean().unstack()
    clean, notes = clean_long(long.astype({"rating": str}), LongColumns(rater="rater"), [], "long.csv")
    means = face_means(clean)
    assert list(means.columns) == ["trust", "happy"]
    pd.testing.assert_frame_equal(means.sort_index()[["happy", "trust"]], given[["happy", "trust"]], check_names=False)
    assert notes == ["7 raters"]
    table = given.reset_index().map(lambda v: f"{v:.3f}" if isinstance(v, float) else v)
    assert mean_disagreements(table, "id", means) == []
    table.loc[3, "trust"] = "9.000"
    [disagreement] = mean_disagreements(table, "id", means)
    assert disagreement.startswith("id 'f11' trust: table 9.000, ratings")
    assert set(reliabilities(clean, splits=20, seed=0)) == {"trust", "happy"}


def test_long_table_errors_name_lines() -> None:
    long = pd.DataFrame({"id": ["a", "a", "b", "b"], "attribute": "trust", "rating": ["3", "high", None, "4,5"],
                         "kind": ["main", "main", "catch", "main"]})
    with pytest.raises(PsyfaceError, match=r"long.csv: rating column 'rating' has non-numeric value\(s\): "
                                           r"line 3 'high', line 5 '4,5'"):
        clean_long(long, LongColumns(), [], "long.csv")
    fine = long.assign(rating=["3", "4", None, "5"])
    clean, notes = clean_long(fine, LongColumns(trial_type="kind"), ["main"], "long.csv")
    assert notes == ["trial types {'main': 3, 'catch': 1}; kept ['main']"]
    assert clean["rating"].tolist() == [3.0, 4.0, 5.0]
    clean, notes = clean_long(fine, LongColumns(), [], "long.csv")
    assert notes == ["1 empty rating cell(s) ignored"] and len(clean) == 3
    with pytest.raises(PsyfaceError, match="at least 3 faces with 2 or more ratings, found 1"):
        split_half(np.array(["a", "a", "b"]), np.array([1.0, 2.0, 3.0]))


def test_published_reliability_table() -> None:
    table = pd.DataFrame({"attribute": ["trust", "happy"], "reliability": ["0.62", "0.84"]})
    assert read_reliability_table(table, "rel.csv") == {"trust": 0.62, "happy": 0.84}
    with pytest.raises(PsyfaceError, match=r"rel.csv: line 3: reliability of 'happy' must be a number in \(0, 1\]"):
        read_reliability_table(table.assign(reliability=["0.6", "84"]), "rel.csv")
    with pytest.raises(PsyfaceError, match=r"column\(s\) \['reliability'\] not found"):
        read_reliability_table(table.rename(columns={"reliability": "r"}), "rel.csv")

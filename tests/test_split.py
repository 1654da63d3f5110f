import pandas as pd
import pytest

from psyface.errors import PsyfaceError
from psyface.split import SplitParams, assign_splits


def identities(n_people: int, shots: int) -> tuple[pd.Series, pd.Series]:
    people = [f"p{i:03d}" for i in range(n_people) for _ in range(shots)]
    ids = [f"{person}_{k % shots}" for k, person in enumerate(people)]
    return pd.Series(ids), pd.Series(people)


def test_split_is_deterministic_and_seeded():
    ids, groups = identities(50, 3)
    first = assign_splits(ids, groups, SplitParams(seed=42))
    assert first.equals(assign_splits(ids, groups, SplitParams(seed=42)))
    assert not first.equals(assign_splits(ids, groups, SplitParams(seed=7)))


def test_no_identity_crosses_splits_and_proportions_hold():
    ids, groups = identities(100, 3)
    result = assign_splits(ids, groups, SplitParams())
    per_identity = result.assign(identity=groups).groupby("identity")["split"].nunique()
    assert per_identity.max() == 1
    shares = result["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.64, abs=0.03)
    assert shares["val"] == pytest.approx(0.16, abs=0.03)
    assert shares["test"] == pytest.approx(0.20, abs=0.03)


def test_without_identities_rows_are_their_own_groups():
    ids = pd.Series([f"img{i}" for i in range(200)])
    result = assign_splits(ids, ids, SplitParams())
    assert result["split"].value_counts()["test"] == 40
    assert list(result["id"]) == list(ids)


def test_bad_fractions_and_tiny_tables_are_clear_errors():
    ids, groups = identities(10, 1)
    with pytest.raises(PsyfaceError, match="summing to 1"):
        assign_splits(ids, groups, SplitParams(fractions={"train": 0.5, "val": 0.1, "test": 0.1}))
    with pytest.raises(PsyfaceError, match="at least 3 groups"):
        assign_splits(ids[:2], groups[:2], SplitParams())

"""Stage `split`: a deterministic train/val/test assignment of the validated rows.

Identities never cross splits (when the dataset declares an identity column): images of the same
person in train and test would inflate every test number. Without one, each image is its own group,
which reproduces the published peer's `train_test_split(random_state=42)` protocol. With
`folds: k` every row also gets a cross-validation `fold` (0..k-1), whole identities per fold.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from psyface.artifacts import SPLIT_FILE, SPLITS
from psyface.config import NonNegativeInt, OpenUnitFloat, load_section
from psyface.dataset.layout import DATA_DIR, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_csv_atomic
from psyface.resampling import grouped_folds

CLEAN_IDS = Path("artifacts/validate/clean.csv")


@dataclass
class SplitParams:
    seed: NonNegativeInt = 42
    fractions: dict[str, OpenUnitFloat] = field(default_factory=lambda: {"train": 0.64, "val": 0.16, "test": 0.2})
    folds: NonNegativeInt = 0  # k >= 2: identity-grouped k-fold cross-validation beside the split; 0 or 1: off


def assign_splits(ids: pd.Series, groups: pd.Series, params: SplitParams) -> pd.DataFrame:
    """Rows (id, split): whole groups go to one split; proportions are over groups."""
    if set(params.fractions) != set(SPLITS) or abs(sum(params.fractions.values()) - 1) > 1e-6:
        raise PsyfaceError(f"split.fractions must give train, val and test summing to 1, got {params.fractions}")
    unique = sorted(groups.unique())
    if len(unique) < 3:
        raise PsyfaceError(f"need at least 3 groups (identities or images) to split, got {len(unique)}")
    rest, test = train_test_split(unique, test_size=params.fractions["test"], random_state=params.seed)
    val_share = params.fractions["val"] / (params.fractions["train"] + params.fractions["val"])
    train, val = train_test_split(rest, test_size=val_share, random_state=params.seed)
    where = {g: name for name, members in zip(SPLITS, (train, val, test)) for g in members}
    return pd.DataFrame({"id": ids.to_numpy(), "split": groups.map(where).to_numpy()})


def read_clean_ids(path: Path = CLEAN_IDS) -> pd.Series:
    if not path.is_file():
        raise PsyfaceError(f"{path} not found: run the validate stage first (`dvc repro validate`)")
    return pd.read_csv(path, dtype={"id": str})["id"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface split", description=__doc__.split("\n\n")[0]).parse_args(argv)
    params = load_section("split", SplitParams)
    spec = load_dataset(DATA_DIR)
    table = spec.read_ratings()
    clean = read_clean_ids()
    rows = table[table[spec.id_column].isin(set(clean))]
    groups = rows[spec.identity_column] if spec.identity_column else rows[spec.id_column]
    assignment = assign_splits(rows[spec.id_column], groups.astype(str), params)
    if params.folds > 1:
        assignment["fold"] = grouped_folds(groups.astype(str).to_numpy(), params.folds, params.seed)
    write_csv_atomic(assignment, SPLIT_FILE)
    counts = assignment["split"].value_counts().reindex(SPLITS, fill_value=0)
    held_back = len(table) - len(rows)
    print(f"split: {len(rows)} clean rows of {len(table)} in the table"
          + (f" ({held_back} quarantined: see reports/validation/quarantine.csv)" if held_back else "")
          + f" -> train {counts['train']}, val {counts['val']}, test {counts['test']}"
          + (f"; grouped by {spec.identity_column!r}" if spec.identity_column else "")
          + (f"; {params.folds} cross-validation folds" if params.folds > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

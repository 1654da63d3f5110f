"""The validate stage: one bad row or file per rule, exact quarantine counts, the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from bad_inputs import IMAGE_CASES
from conftest import run_cli
from factories import read_table, write_table

from psyface.dataset.layout import DatasetSpec
from psyface.errors import PsyfaceError
from psyface.validate import run

REPORTS = Path("reports/validation")
CLEAN = Path("artifacts/validate/clean.csv")


def run_stage(policy: str = "fail", min_side: int = 32) -> str:
    Path("params.yaml").write_text(f"validate:\n  on_bad_rows: {policy}\n  min_image_side: {min_side}\n")
    return run()


def summary() -> dict:
    return json.loads((REPORTS / "summary.json").read_text())


def quarantine() -> pd.DataFrame:
    return pd.read_csv(REPORTS / "quarantine.csv", dtype=str, keep_default_na=False)


def edit_cell(spec: DatasetSpec, row: int, column: str, value: object) -> None:
    table = read_table(spec)
    table[column] = table[column].astype(object)
    table.loc[row, column] = value
    write_table(spec, table)


def test_clean_dataset_passes(tiny_dataset: DatasetSpec) -> None:
    assert run_stage()
    assert pd.read_csv(CLEAN, dtype=str)["id"].tolist() == [f"f{i:03d}" for i in range(6)]
    assert quarantine().empty and list(quarantine().columns) == ["id", "file", "rule", "message"]
    report = summary()
    assert report["passed"] is True and report["all_rows_clean"] is True
    assert report["rows"] == {"total": 6, "clean": 6, "failing": 0}
    assert set(report["rules"].values()) == {0}
    assert {"id_unique", "rating_in_scale:happy", "category_in_set:gender", "image:missing_file"} <= set(
        report["rules"]
    )
    gx_result = json.loads((REPORTS / "gx_result.json").read_text())
    types = {r["expectation_config"]["type"] for r in gx_result["results"]}
    assert {"expect_column_values_to_be_unique", "expect_column_values_to_be_between"} <= types


def test_reports_are_byte_identical_across_runs(tiny_dataset: DatasetSpec) -> None:
    edit_cell(tiny_dataset, 1, "happy", "8")
    files = [REPORTS / name for name in ("summary.json", "gx_result.json", "quarantine.csv")]
    run_stage("quarantine")
    first = [path.read_bytes() for path in files]
    run_stage("quarantine")
    assert [path.read_bytes() for path in files] == first


ROW_RULES: dict[str, tuple[int, str, object, str, str]] = {
    # case: (row, column, new value, rule, words the message must contain)
    "empty id": (2, "id", None, "id_not_null", "is empty"),
    "nan rating": (2, "happy", None, "rating_present:happy", "rating 'happy' is empty"),
    "text rating": (2, "happy", "very", "rating_numeric:happy", "happy='very' is not a number"),
    "out of scale": (2, "trustworthy", "7.5", "rating_in_scale:trustworthy", "trustworthy=7.5 is outside"),
    "below scale": (2, "happy", "-1", "rating_in_scale:happy", "happy=-1 is outside"),
    "unknown category": (2, "gender", "robot", "category_in_set:gender", "gender='robot' is not a declared"),
    "empty category": (2, "expression", None, "category_present:expression", "'expression' is empty"),
    "id escaping the folder": (2, "id", "../f002", "image:unsafe_id", "'../f002' is not a plain file name"),
    "absolute id": (2, "id", "/etc/passwd", "image:unsafe_id", "'/etc/passwd' is not a plain file name"),
    "row without file": (2, "id", "f999", "image:missing_file", "data/images/f999.png: file not found"),
}


@pytest.mark.parametrize("case", ROW_RULES)
def test_each_row_rule_fails_naming_row_and_rule(tiny_dataset: DatasetSpec, case: str) -> None:
    row, column, value, rule, words = ROW_RULES[case]
    edit_cell(tiny_dataset, row, column, value)
    with pytest.raises(PsyfaceError) as failure:
        run_stage()
    message = str(failure.value)
    assert f"{rule}: row 3 (line 4 of data/ratings.csv" in message
    assert words in message
    assert summary()["rules"][rule] == 1
    assert summary()["rows"]["failing"] == 1
    assert rule in quarantine()["rule"].tolist()
    assert not CLEAN.exists()


def test_duplicate_ids_quarantine_every_copy(tiny_dataset: DatasetSpec) -> None:
    edit_cell(tiny_dataset, 4, "id", "f001")
    assert run_stage("quarantine")
    found = quarantine()
    assert found["rule"].tolist() == ["id_unique", "id_unique"]
    assert "id 'f001' is not unique (rows [2, 5])" in found["message"][0]
    assert pd.read_csv(CLEAN, dtype=str)["id"].tolist() == ["f000", "f002", "f003", "f005"]
    assert summary()["orphan_images"] == {"count": 1, "files": ["data/images/f004.png"]}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image_corpus(tiny_dataset: DatasetSpec, case: str) -> None:
    writer, _, outcome = IMAGE_CASES[case]
    writer(tiny_dataset.root / "images" / "f003.png")
    if outcome == "ok":
        assert run_stage(), f"{case} should be converted, not rejected"
        return
    with pytest.raises(PsyfaceError) as failure:
        run_stage()
    assert f"image:{outcome}: row 4 (line 5 of data/ratings.csv, id 'f003'): data/images/f003.png" in str(
        failure.value
    )
    assert summary()["rules"][f"image:{outcome}"] == 1
    assert summary()["failing_files"] == ["data/images/f003.png"]


def test_decompression_limit_is_psyfaces_own(tiny_dataset: DatasetSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40x40 = 1600 px > 2 x 500
    with pytest.raises(PsyfaceError, match="image:too_many_pixels"):
        run_stage()
    assert summary()["rules"]["image:too_many_pixels"] == 6


def test_min_image_side_comes_from_params(tiny_dataset: DatasetSpec) -> None:
    with pytest.raises(PsyfaceError, match="40x40 px is below the minimum side 48 px"):
        run_stage(min_side=48)
    assert summary()["rules"]["image:too_small"] == 6


def test_image_without_row_is_reported_not_failed(tiny_dataset: DatasetSpec) -> None:
    (tiny_dataset.root / "images" / "stray.png").write_bytes((tiny_dataset.root / "images/f000.png").read_bytes())
    assert run_stage()
    assert summary()["orphan_images"] == {"count": 1, "files": ["data/images/stray.png"]}


def test_quarantine_counts_are_exact(tiny_dataset: DatasetSpec) -> None:
    table = read_table(tiny_dataset)
    table.loc[0, "happy"] = "9"  # out of scale
    table.loc[1, "happy"] = "x"  # text
    table.loc[1, "gender"] = "robot"  # same row, second rule
    write_table(tiny_dataset, table)
    (tiny_dataset.root / "images/f005.png").unlink()
    printed = run_stage("quarantine")
    report = summary()
    assert report["passed"] is True and report["all_rows_clean"] is False
    assert report["rows"] == {"total": 6, "clean": 3, "failing": 3}
    assert report["rules"]["rating_in_scale:happy"] == 1
    assert report["rules"]["rating_numeric:happy"] == 1
    assert report["rules"]["category_in_set:gender"] == 1
    assert report["rules"]["image:missing_file"] == 1
    assert sorted(report["failing_ids"]) == ["f000", "f001", "f005"]
    assert len(quarantine()) == 4
    assert pd.read_csv(CLEAN, dtype=str)["id"].tolist() == ["f002", "f003", "f004"]
    assert "6 rows, 3 clean, 3 quarantined (4 findings)" in printed


def test_missing_declared_column_fails_under_every_policy(tiny_dataset: DatasetSpec) -> None:
    write_table(tiny_dataset, read_table(tiny_dataset).drop(columns=["trustworthy"]))
    with pytest.raises(PsyfaceError) as failure:
        run_stage("quarantine")
    assert "declared column 'trustworthy' is missing; columns found: ['id', 'happy', 'gender', 'expression']" in str(
        failure.value
    )
    assert summary()["rules"]["column_present:trustworthy"] == 1
    assert not CLEAN.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "is empty"),
        (b"id,happy,trustworthy,gender,expression\n", "has a header but no rows"),
        ("id,happy,trustworthy,gender,expression\nf000,2,2,m\xe4le,neutral\n".encode("latin-1"), "is not UTF-8"),
    ],
    ids=["zero bytes", "header only", "latin-1"],
)
def test_unreadable_tables(tiny_dataset: DatasetSpec, content: bytes, words: str) -> None:
    tiny_dataset.ratings_path.write_bytes(content)
    with pytest.raises(PsyfaceError, match=words) as failure:
        run_stage("quarantine")
    assert "data/ratings.csv" in str(failure.value)


def test_quarantine_with_no_clean_row_fails(tiny_dataset: DatasetSpec) -> None:
    table = read_table(tiny_dataset)
    table["happy"] = "99"
    write_table(tiny_dataset, table)
    with pytest.raises(PsyfaceError, match="no row passes validation: 6 of 6 rows"):
        run_stage("quarantine")


@pytest.mark.slow
def test_cli_exits_2_with_summary_and_no_traceback(tiny_dataset: DatasetSpec, workdir: Path) -> None:
    edit_cell(tiny_dataset, 1, "happy", "11")
    done = run_cli("validate", cwd=workdir, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("psyface: error: validation failed: 1 of 6 rows break 1 rule(s)")
    assert "rating_in_scale:happy: row 2 (line 3 of data/ratings.csv, id 'f001')" in done.stderr
    assert "Traceback" not in done.stderr
    assert (workdir / REPORTS / "quarantine.csv").is_file()


def test_cli_without_data_says_how_to_get_it(workdir: Path) -> None:
    done = run_cli("validate", cwd=workdir, timeout=120)
    assert done.returncode == 2
    assert "data/dataset.yaml not found" in done.stderr and "Traceback" not in done.stderr


def test_unknown_params_key_is_rejected(tiny_dataset: DatasetSpec) -> None:
    Path("params.yaml").write_text("validate:\n  on_bad_row: fail\n")
    with pytest.raises(PsyfaceError, match="unknown key"):
        run()



def test_generated_synthetic_dataset_passes(synthetic_data: Path, workdir: Path) -> None:
    (workdir / "data").symlink_to(synthetic_data)
    Path("params.yaml").write_text("validate:\n  on_bad_rows: fail\n")
    assert run().startswith("validate: 48 rows, 48 clean, 0 quarantined (0 findings), 0 image file(s) with no row")
    assert summary()["rules"]["rating_in_scale:trustworthy"] == 0

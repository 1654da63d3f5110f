"""`psyface import generic|us10k`: canonical layout out, every bad input named in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
from bad_inputs import IMAGE_CASES
from conftest import run_cli
from factories import draw_face
from PIL import Image

from psyface.dataset.importers import US10K_ATTRIBUTES, safe_id
from psyface.dataset.importers import main as import_main
from psyface.dataset.layout import load_dataset
from psyface.errors import PsyfaceError
from psyface.validate import ValidateParams, validate_dataset


def run_import(*args: str) -> None:
    """The command in-process, with its PsyfaceError visible to pytest.raises."""
    import_main.__wrapped__(list(args))


def face_folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        draw_face(40, shade=i * 5).save(root / name)
    return root


def ratings_frame(ids: list[str]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame(
        {
            "image": ids,
            "trust": [2 + i % 4 for i in range(n)],
            "happy": [1.5 + i % 5 for i in range(n)],
            "sex": ["f" if i % 2 else "m" for i in range(n)],
            "mood": ["calm" if i % 3 else "tense" for i in range(n)],
        }
    )


@pytest.fixture
def source(workdir: Path) -> Path:
    """src/ with 5 faces (one name with a space) and ratings.csv naming them; nothing imported yet."""
    ids = ["a0", "a1", "a 2", "a3", "a4"]
    face_folder(workdir / "src", [f"{i}.jpg" for i in ids])
    ratings_frame(ids).to_csv(workdir / "ratings.csv", index=False)
    return workdir


def generic(*extra: str, ratings: str = "ratings.csv") -> None:
    run_import(
        "generic", "--images", "src", "--ratings", ratings, "--id-column", "image",
        "--filename-template", "{id}.jpg", "--sensitive", "sex", "--out", "data", *extra,
    )  # fmt: skip


def test_generic_csv_writes_the_canonical_layout(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generic("--scale", "1", "7")
    printed = capsys.readouterr().out
    spec = load_dataset(source / "data")
    assert spec.attribute_names == ["trust", "happy"]
    assert spec.attributes["happy"].scale == (1.0, 7.0)
    assert spec.sensitive_features == {"sex": ["f", "m"]}
    assert spec.labels == {"mood": ["calm", "tense"]}
    assert spec.reliability == {}
    table = spec.read_ratings()
    assert table["id"].tolist() == ["a0", "a1", "a_2", "a3", "a4"]
    assert table["source_id"].tolist()[2] == "a 2"
    with Image.open(spec.image_path("a_2")) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))
    assert spec.image_path("a_2").read_bytes() == (source / "src" / "a 2.jpg").read_bytes()  # the lab's bytes
    assert "5 stored in data/images/ (5 kept as the original file, 0 re-encoded as PNG)" in printed
    assert "numeric -> attributes ['trust', 'happy'], non-numeric -> labels ['mood']" in printed
    assert printed.rstrip().endswith("next: dvc add data")
    assert validate_dataset(spec, ValidateParams()).all_clean


def test_generic_xlsx_sheet_and_inferred_scale(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workbook = openpyxl.Workbook()
    workbook.active.title = "notes"
    sheet = workbook.create_sheet("means")
    frame = ratings_frame(["1", "2", "3"])
    frame["image"] = [1, 2, 3]  # numeric ids, as Excel stores them
    sheet.append(list(frame.columns))
    for row in frame.itertuples(index=False):
        sheet.append(list(row))
    workbook.save(source / "ratings.xlsx")
    face_folder(source / "src", ["1.jpg", "2.jpg", "3.jpg"])
    generic("--sheet", "means", ratings="ratings.xlsx")
    spec = load_dataset(source / "data")
    assert spec.read_ratings()["id"].tolist() == ["1", "2", "3"]
    assert spec.attributes["trust"].scale == (1.0, 4.0)
    printed = capsys.readouterr().out
    assert "scale [1.0, 4.0] inferred from the data; pass --scale LO HI to set it" in printed
    assert "image files in src with no row (not imported): 5" in printed
    with pytest.raises(PsyfaceError, match=r"has no sheet 'Final'; sheets found: \['notes', 'means'\]"):
        generic("--sheet", "Final", "--force", ratings="ratings.xlsx")


HEADER = b"image,trust,happy,sex,mood\n"
TABLE_ERRORS = {
    "zero bytes": (b"", "ratings.csv is empty"),
    "header only": (HEADER, "has no data rows"),
    "latin-1": (HEADER + "a0,2,2,f\xe4,calm\n".encode("latin-1"), "is not UTF-8 text (byte 0xe4"),
    "no id column": (b"name,trust,sex\na0,2,f\n", "column(s) ['image'] not found; columns found: ['name', 'trust'"),
    "duplicate ids": (HEADER + b"a0,2,2,f,calm\na0,3,3,m,calm\n", "column 'image': 'a0' on lines [2, 3]"),
    "dot-dot id": (HEADER + b"../a0,2,2,f,calm\n", "image would lie outside src: line 2 '../a0'"),
    "absolute id": (HEADER + b"/etc/a0,2,2,f,calm\n", "image would lie outside src: line 2 '/etc/a0'"),
    "id clash": (HEADER + b"a 0,2,2,f,calm\na_0,3,3,m,calm\n", "become the same file name: {'a_0': ['a 0', 'a_0']}"),
}


@pytest.mark.parametrize("case", TABLE_ERRORS)
def test_generic_table_errors_name_file_and_rule(source: Path, case: str) -> None:
    table, words = TABLE_ERRORS[case]
    (source / "ratings.csv").write_bytes(table)
    with pytest.raises(PsyfaceError, match="ratings.csv") as failure:
        generic()
    assert words in str(failure.value)
    assert not (source / "data").exists()


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image_corpus_on_import(source: Path, case: str) -> None:
    writer, suffix, outcome = IMAGE_CASES[case]
    (source / "src" / "a3.jpg").unlink()
    writer(source / "src" / f"a3{suffix}")
    table = pd.read_csv(source / "ratings.csv", dtype=str)
    table["image"] = [f"{name}{suffix if name == 'a3' else '.jpg'}" for name in table["image"]]
    table.to_csv(source / "ratings.csv", index=False)
    run_import(
        "generic", "--images", "src", "--ratings", "ratings.csv", "--id-column", "image",
        "--filename-template", "{id}", "--out", "data", "--scale", "1", "7",
    )  # fmt: skip
    spec = load_dataset(source / "data")
    result = validate_dataset(spec, ValidateParams(min_image_side=32))
    problems = spec.source["import_problems"]
    if outcome == "ok":
        assert problems == {} and result.all_clean
        assert np.asarray(Image.open(spec.image_path("a3"))).shape == (40, 40, 3)
        return
    if outcome == "too_small":  # converted at import; the size rule belongs to validate
        assert problems == {}
    else:
        assert problems["a3"].startswith(f"{outcome}: src/a3{suffix}")
    [finding] = result.findings
    expected = "image:too_small" if outcome == "too_small" else "image:missing_file"
    assert (finding.id, finding.rule) == ("a3", expected)
    assert outcome in finding.message if outcome != "too_small" else "1x1 px" in finding.message


def test_missing_image_and_bad_ratings_reach_validate(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (source / "src" / "a1.jpg").unlink()
    table = pd.read_csv(source / "ratings.csv", dtype=str)
    table.loc[0, "trust"], table.loc[4, "happy"] = "seven", "12"
    table.to_csv(source / "ratings.csv", index=False)
    generic("--scale", "1", "7")
    printed = capsys.readouterr().out
    assert "a1: missing_file: src/a1.jpg: file not found" in printed
    assert "trust: 1 non-numeric cell(s); validate will report them" in printed
    result = validate_dataset(load_dataset(source / "data"), ValidateParams())
    assert sorted((f.id, f.rule) for f in result.findings) == [
        ("a0", "rating_numeric:trust"),
        ("a1", "image:missing_file"),
        ("a4", "rating_in_scale:happy"),
    ]


def test_output_is_not_overwritten_without_force(source: Path) -> None:
    (source / "data").mkdir()
    (source / "data" / "keep.txt").write_text("mine")
    with pytest.raises(PsyfaceError, match="data exists and is not empty; pass --force"):
        generic()
    generic("--force")
    assert not (source / "data" / "keep.txt").exists()
    assert (source / "data" / "dataset.yaml").is_file()


def test_safe_id() -> None:
    assert safe_id("Aaron_Nickell_11_oval.jpg") == "Aaron_Nickell_11_oval"
    assert safe_id("face 1 (copy).JPEG") == "face_1_copy_"
    assert safe_id(".hidden") == "hidden"


# ------------------------------------------------------------------------------------------- us10k
def write_sheet(workbook: openpyxl.Workbook, title: str, rows: list[list[object]]) -> None:
    sheet = workbook.create_sheet(title)
    for row in rows:
        sheet.append(row)


def make_us10k(root: Path) -> list[str]:
    """A miniature 10k US Adult Faces folder: 4 rated faces, 1 unrated, aggregate and demographic sheets."""
    names = ["Aaron_Nickell_11_oval.jpg", "Ann_Lee_3_oval.jpg", "Bo_Chen_7_oval.jpg", "Cy_Diaz_2_oval.jpg"]
    face_folder(root / "Face Images", [*names, "Unrated_Person_1_oval.jpg"])
    attributes = root / "Full Attribute Scores/psychology attributes/psychology-attributes.xlsx"
    attributes.parent.mkdir(parents=True)
    workbook = openpyxl.Workbook()
    workbook.active.title = "Per Rater"
    header = ["Filename", "happy", "trustworthy", "attractive"]
    write_sheet(workbook, "Final Values", [header, *[[n, 3 + i, 4.5 - i / 2, 5 + i / 4] for i, n in enumerate(names)]])
    write_sheet(workbook, "StDev Values", [header, *[[n, 1, 1, 1] for n in names]])
    workbook.save(attributes)
    demographics = root / "Full Attribute Scores/demographic & others labels/demographic-others-labels.xlsx"
    demographics.parent.mkdir(parents=True)
    workbook = openpyxl.Workbook()
    workbook.active.title = "labels"
    rows = [["Filename", "Age", "Gender", "Race", "Emotion", "Attractive"]]
    rows += [[n, 2 + i % 2, i % 2, [1, 2, 3][i % 3], "neutral", 3] for i, n in enumerate(names[:3])]
    for row in rows:
        workbook.active.append(row)
    workbook.save(demographics)
    return names


def test_us10k_miniature(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = make_us10k(workdir / "us10k")
    run_import("us10k", "us10k", "--out", "data")
    printed = capsys.readouterr().out
    spec = load_dataset(workdir / "data")
    assert spec.attribute_names == ["happy", "trustworthy", "attractive"]
    assert spec.attributes["happy"].scale == (1.0, 9.0)
    assert spec.sensitive_features == {
        "Gender": ["0", "1", "unknown"],
        "Race": ["black", "east_asian", "white", "unknown"],
        "Age": ["2", "3", "unknown"],
    }
    assert spec.labels == {"Emotion": ["neutral", "unknown"]}
    table = spec.read_ratings()
    assert table["id"].tolist() == [n.removesuffix(".jpg") for n in names]
    assert table.loc[3, "Race"] == "unknown"
    assert "1 face(s) have no demographic row" in printed
    assert "image files in us10k/Face Images with no row (not imported): 1" in printed
    assert printed.rstrip().endswith("next: dvc add data")
    assert validate_dataset(spec, ValidateParams()).all_clean


def test_us10k_missing_column_lists_columns_found(workdir: Path) -> None:
    make_us10k(workdir / "us10k")
    with pytest.raises(PsyfaceError, match=r"column\(s\) \['Image'\] not found; columns found: \['Filename', 'happy'"):
        run_import("us10k", "us10k", "--filename-column", "Image")
    with pytest.raises(PsyfaceError, match=r"\['Ethnicity'\] not found; columns found: \['Filename', 'Age'"):
        run_import("us10k", "us10k", "--sensitive", "Gender", "--sensitive", "Ethnicity")
    with pytest.raises(PsyfaceError, match=r"has no sheet 'Means'; sheets found: \['Per Rater', 'Final Values'"):
        run_import("us10k", "us10k", "--attributes-sheet", "Means")


def test_cli_import_success_and_failure(source: Path) -> None:
    tail = ["--id-column", "image", "--filename-template", "{id}.jpg", "--out", "data"]
    done = run_cli("import", "generic", "--images", "src", "--ratings", "ratings.csv", *tail, cwd=source, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("next: dvc add data")
    (source / "bad.csv").write_bytes(b"")
    done = run_cli("import", "generic", "--images", "src", "--ratings", "bad.csv", *tail, cwd=source, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("psyface: error: bad.csv is empty") and "Traceback" not in done.stderr


# ------------------------------------------------------------------- real sets: bytes, tables, ratings
def rotated_jpeg(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    draw_face(40).resize((48, 40)).save(path, "JPEG", exif=exif)


def test_symlinked_folder_imports_and_originals_are_kept_others_converted(workdir: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    drive = face_folder(workdir / "drive" / "faces", ["k0.jpg", "k1.jpg"])
    draw_face(40).save(drive / "p0.png")  # 8-bit RGB PNG: kept
    draw_face(40).convert("CMYK").save(drive / "c0.jpg", "JPEG")
    draw_face(40).convert("P").save(drive / "q0.png")
    draw_face(40).convert("L").save(drive / "g0.jpg", "JPEG")
    rotated_jpeg(drive / "r0.jpg")
    (workdir / "faces").symlink_to(drive, target_is_directory=True)
    names = ["k0.jpg", "k1.jpg", "p0.png", "c0.jpg", "q0.png", "g0.jpg", "r0.jpg"]
    ratings_frame(names).to_csv(workdir / "ratings.csv", index=False)
    run_import("generic", "--images", "faces", "--ratings", "ratings.csv", "--id-column", "image",
               "--filename-template", "{id}", "--scale", "1", "7", "--out", "data")
    printed = capsys.readouterr().out
    spec = load_dataset(workdir / "data")
    assert spec.image_template == "images/{id}.{ext}"
    assert spec.image_path("k0").name == "k0.jpg" and spec.image_path("p0").name == "p0.png"
    assert spec.image_path("k0").read_bytes() == (drive / "k0.jpg").read_bytes()
    assert spec.image_path("p0").read_bytes() == (drive / "p0.png").read_bytes()
    for converted in ("c0", "q0", "g0", "r0"):
        with Image.open(spec.image_path(converted)) as image:
            assert (spec.image_path(converted).suffix, image.format, image.mode) == (".png", "PNG", "RGB")
    with Image.open(spec.image_path("r0")) as image:
        assert image.size == (40, 48)  # the EXIF rotation applied
    assert "7 stored in data/images/ (3 kept as the original file, 4 re-encoded as PNG), 0 not imported" in printed
    for line in ("2 kept: jpg linked", "1 kept: png linked", "1 converted: CMYK", "1 converted: palette",
                 "1 converted: grey", "1 converted: EXIF-rotated"):
        assert f"    {line}\n" in printed
    assert validate_dataset(spec, ValidateParams()).all_clean
    run_import("generic", "--images", "faces", "--ratings", "ratings.csv", "--id-column", "image",
               "--filename-template", "{id}", "--scale", "1", "7", "--out", "data", "--force", "--copy", "--workers", "1")
    assert "2 kept: jpg copied" in capsys.readouterr().out
    assert spec.image_path("k0").stat().st_ino != (drive / "k0.jpg").stat().st_ino


def test_semicolon_decimal_comma_and_tab_tables(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = ratings_frame(["a0", "a1", "a 2", "a3", "a4"])
    frame.to_csv(source / "ratings.csv", sep=";", decimal=",", index=False)
    generic("--scale", "1", "7")
    printed = capsys.readouterr().out
    assert "ratings.csv: delimiter semicolon (';') detected" in printed
    assert "ratings.csv: decimal commas read in column(s) ['happy']" in printed
    table = load_dataset(source / "data").read_ratings()
    assert table["happy"].tolist() == frame["happy"].tolist()
    frame.to_csv(source / "ratings.csv", sep="\t", index=False)
    generic("--scale", "1", "7", "--force")
    assert "delimiter tab ('\\t') detected" in capsys.readouterr().out
    (source / "ratings.csv").write_bytes("\ufeff".encode() + frame.to_csv(index=False).encode())  # Excel's BOM
    generic("--scale", "1", "7", "--force")
    assert "delimiter comma (',') detected" in capsys.readouterr().out


def test_ambiguous_table_names_both_readings(source: Path) -> None:
    (source / "ratings.csv").write_text("image;x,trust;y\na0;1,2;3\n", encoding="utf-8")
    with pytest.raises(PsyfaceError, match=r"ambiguous table, it reads two ways \(as comma-separated: columns "
                                           r"\['image;x', 'trust;y'\]; as semicolon-separated: columns \['image', 'x,trust', 'y'\]\)"):
        run_import("generic", "--images", "src", "--ratings", "ratings.csv", "--id-column", "id")


def long_table(ids: list[str], raters: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    true = {name: rng.normal(4, 1, len(ids)) for name in ("trust", "happy")}
    rows = [{"image": image, "who": f"r{r}", "attribute": name, "rating": int(np.clip(round(true[name][i]
                                                                                       + rng.normal()), 1, 7))}
            for name in true for i, image in enumerate(ids) for r in range(raters)]
    return pd.DataFrame(rows)


def test_long_ratings_give_means_and_reliability(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = ["a0", "a1", "a 2", "a3", "a4"]
    long = long_table(ids)
    long.to_csv(source / "long.csv", index=False)
    means = long.groupby(["image", "attribute"], sort=False)["rating"].mean().unstack()
    frame = ratings_frame(ids).drop(columns=["trust", "happy"]).join(means.round(2), on="image")
    frame.to_csv(source / "ratings.csv", index=False)
    generic("--ratings-long", "long.csv", "--rater-column", "who", "--scale", "1", "7")
    printed = capsys.readouterr().out
    spec = load_dataset(source / "data")
    assert set(spec.reliability) == {"trust", "happy"} and all(r <= 1 for r in spec.reliability.values())
    record = spec.source["reliability"]["attributes"]["trust"]
    assert record["faces"] == 5 and record["ratings_per_face_min"] == 6 and 190 <= record["splits"] <= 200
    assert "ratings: 60 from long.csv; 6 raters" in printed and "reliability trust: " in printed
    assert "5 faces with 6-6 ratings (mean 6.0)" in printed

    frame.loc[1, "trust"] = 1.0 if frame.loc[1, "trust"] != 1.0 else 7.0
    frame.to_csv(source / "ratings.csv", index=False)
    with pytest.raises(PsyfaceError, match=r"disagrees with the means of long.csv in 1 cell\(s\): id 'a1' trust: table"):
        generic("--ratings-long", "long.csv", "--force")

    run_import("generic", "--images", "src", "--ratings-long", "long.csv", "--id-column", "image",
               "--filename-template", "{id}.jpg", "--out", "only_long", "--scale", "1", "7")
    only = load_dataset(source / "only_long")
    table = only.read_ratings()
    assert table["trust"].astype(float).round(6).tolist() == means.loc[ids, "trust"].round(6).tolist()
    assert set(only.reliability) == {"trust", "happy"}


def test_published_reliability_file(source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (source / "rel.csv").write_text("attribute;reliability\ntrust;0,62\n", encoding="utf-8")
    generic("--reliability", "rel.csv", "--scale", "1", "7")
    printed = capsys.readouterr().out
    assert load_dataset(source / "data").reliability == {"trust": 0.62}
    assert "reliability: trust=0.620 from rel.csv" in printed and "reliability: unknown for ['happy']" in printed
    (source / "rel.csv").write_text("attribute,reliability\nfriendly,0.5\n", encoding="utf-8")
    with pytest.raises(PsyfaceError, match=r"reliability given for \['friendly'\], which are not attributes"):
        generic("--reliability", "rel.csv", "--force")


def test_us10k_per_rater_sheet(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = make_us10k(workdir / "us10k")
    path = workdir / "us10k" / US10K_ATTRIBUTES
    workbook = openpyxl.load_workbook(path)
    del workbook["Per Rater"]
    final = {row[0]: row[1:] for row in workbook["Final Values"].iter_rows(min_row=2, values_only=True)}
    rows = [["Filename", "Rater", "happy", "trustworthy", "attractive"]]
    for name in names:  # two raters per face whose ratings average to the Final Values
        for sign in (-1, 1):
            rows.append([name, f"r{sign}", *[v + sign * 0.5 for v in final[name]]])
    write_sheet(workbook, "Per Rater", rows)
    workbook.save(path)
    run_import("us10k", "us10k", "--rater-sheet", "Per Rater", "--rater-column", "Rater", "--out", "data")
    printed = capsys.readouterr().out
    spec = load_dataset(workdir / "data")
    assert set(spec.reliability) == {"happy", "trustworthy", "attractive"}
    assert "ratings: 24 from " in printed and "2 raters" in printed

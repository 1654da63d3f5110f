"""`psyface import generic|us10k`: bring a rated face collection into the canonical `data/` layout.

Images are decoded once through the shared loader (`psyface.images`) and written as 8-bit RGB PNG,
`images/{id}.png`: every later stage then sees one format, and CMYK, greyscale, palette, RGBA and
16-bit files are converted here rather than rejected. A file that cannot be decoded (or is missing)
is not written; its row stays in `ratings.csv` and the reason is recorded in `dataset.yaml` under
`source.import_problems`, so `psyface validate` reports it and nothing disappears silently. Size rules
(`validate.min_image_side`) are left to validate. Ids become file-name-safe: characters outside
`[A-Za-z0-9._-]` turn into `_`, a trailing image extension is dropped; the original id is kept in
the `source_id` column. Rating cells are copied as written, so validate can name a bad one.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from psyface.dataset.layout import DATA_DIR, Attribute, DatasetSpec
from psyface.errors import PsyfaceError, entry_point
from psyface.images import ImageProblem, decode_image
from psyface.io import read_csv_checked, replace_dir_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
UNKNOWN = "unknown"
SOURCE_ID = "source_id"

US10K_IMAGES = "Face Images"
US10K_ATTRIBUTES = "Full Attribute Scores/psychology attributes/psychology-attributes.xlsx"
US10K_DEMOGRAPHICS = "Full Attribute Scores/demographic & others labels/demographic-others-labels.xlsx"
# The database documents its race codes inconsistently: this default is a guess to check (--race-codes).
US10K_COLUMNS = {"sensitive": ["Gender", "Race", "Age"], "labels": ["Emotion"]}
US10K_RACE_CODES = "0=other,1=white,2=black,3=east_asian,4=south_asian,5=hispanic,6=middle_eastern"


@dataclass
class ImportPlan:
    """What to import: a text table plus how its columns and image files are to be read."""

    name: str
    table: pd.DataFrame
    id_column: str
    images_dir: Path
    filename_template: str
    attributes: list[str]
    sensitive: list[str]
    labels: list[str]
    scale: tuple[float, float]
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- reading
def as_text(value: Any) -> Any:
    """A cell as the text a person would read (1.0 from Excel -> "1"); blanks stay NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text if text else math.nan


def read_ratings_table(path: Path, sheet: str | None = None) -> pd.DataFrame:
    """A .csv (UTF-8) or .xlsx sheet as a text table; each way it can fail names the file."""
    if not path.is_file():
        raise PsyfaceError(f"ratings table {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if sheet is not None:
            raise PsyfaceError(f"--sheet applies to .xlsx files, but {path} is a CSV")
        table = read_csv_checked(path, dtype=str, keep_default_na=True)
    elif suffix == ".xlsx":
        table = read_sheet(path, sheet)
    else:
        raise PsyfaceError(f"{path}: ratings must be a .csv or .xlsx file, got {suffix or 'no extension'!r}")
    table = table.map(as_text).dropna(how="all")
    if table.empty:
        raise PsyfaceError(f"{path}{f' sheet {sheet!r}' if sheet else ''} has no data rows: nothing to import")
    table.columns = [str(c).strip() for c in table.columns]
    return table.reset_index(drop=True)


def read_sheet(path: Path, sheet: str | None) -> pd.DataFrame:
    """One sheet (the first when `sheet` is None); a wrong name lists the sheets that exist."""
    import openpyxl

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as error:  # openpyxl raises many types for a file that is not a workbook
        raise PsyfaceError(f"cannot open {path} as an .xlsx workbook: {error}") from None
    try:
        names = workbook.sheetnames
        if sheet is not None and sheet not in names:
            raise PsyfaceError(f"{path} has no sheet {sheet!r}; sheets found: {names}")
        rows = list(workbook[sheet or names[0]].iter_rows(values_only=True))
    finally:
        workbook.close()
    if not rows:
        raise PsyfaceError(f"{path} sheet {sheet or names[0]!r} is empty: expected a header row")
    header = [f"column_{i + 1}" if c is None else str(c) for i, c in enumerate(rows[0])]
    return pd.DataFrame(rows[1:], columns=header, dtype=object)


def require_columns(table: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PsyfaceError(f"{where}: column(s) {missing} not found; columns found: {list(table.columns)}")


# -------------------------------------------------------------------------------- pure decisions
def is_number(text: Any) -> bool:
    try:
        return not math.isnan(float(text))
    except (TypeError, ValueError):
        return False


def classify_columns(table: pd.DataFrame, named: set[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the columns not named on the command line into attributes, labels and notes.

    A column is an attribute when at least half its non-empty cells are numbers (the rest are bad
    ratings for validate to report); otherwise it is a label, unless every value differs (a name or
    a comment), which is kept in ratings.csv but not declared.
    """
    attributes, labels, notes = [], [], []
    for column in table.columns:
        if column in named:
            continue
        values = table[column].dropna()
        numeric = sum(map(is_number, values))
        if len(values) and numeric * 2 >= len(values):
            attributes.append(column)
            if numeric < len(values):
                notes.append(f"{column}: {len(values) - numeric} non-numeric cell(s); validate will report them")
        elif values.nunique() == len(table) and len(table) > 1:
            notes.append(f"{column}: every value differs, kept in ratings.csv but not declared")
        else:
            labels.append(column)
    return attributes, labels, notes


def inferred_scale(table: pd.DataFrame, attributes: list[str]) -> tuple[float, float]:
    """[floor(min), ceil(max)] over all attribute values: a guess, reported as one."""
    values = pd.to_numeric(table[attributes].stack(), errors="coerce").dropna()
    if values.empty:
        raise PsyfaceError("no numeric rating found, so no scale can be inferred; pass --scale LO HI")
    low, high = math.floor(values.min()), math.ceil(values.max())
    return float(low), float(high if high > low else low + 1)


def safe_id(raw: str) -> str:
    """A file-name-safe id: image extension dropped, other characters than [A-Za-z0-9._-] -> '_'."""
    stem = raw[: -len(Path(raw).suffix)] if Path(raw).suffix.lower() in IMAGE_SUFFIXES else raw
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")


def check_ids(table: pd.DataFrame, id_column: str, images_dir: Path, template: str, where: str) -> list[str]:
    """Canonical ids for the rows; empty, duplicate, escaping or colliding ids are errors naming rows."""
    raw = table[id_column]
    empty = [i + 2 for i, v in enumerate(raw) if pd.isna(v)]
    if empty:
        raise PsyfaceError(f"{where}: id column {id_column!r} is empty on line(s) {empty[:10]}")
    duplicated = {v: [i + 2 for i, w in enumerate(raw) if w == v] for v, n in Counter(raw).items() if n > 1}
    if duplicated:
        listed = "; ".join(f"{v!r} on lines {lines}" for v, lines in list(duplicated.items())[:10])
        raise PsyfaceError(f"{where}: duplicate ids in column {id_column!r}: {listed}")
    base = images_dir.resolve()
    escaping = [
        (i + 2, v) for i, v in enumerate(raw) if not (images_dir / template.format(id=v)).resolve().is_relative_to(base)
    ]
    if escaping:
        raise PsyfaceError(
            f"{where}: id(s) whose image would lie outside {images_dir}: "
            + ", ".join(f"line {line} {v!r}" for line, v in escaping[:10])
        )
    ids = [safe_id(v) for v in raw]
    bad = [(i + 2, v) for i, (v, s) in enumerate(zip(raw, ids, strict=True)) if not s]
    if bad:
        raise PsyfaceError(f"{where}: id(s) with no usable characters: {bad[:10]}")
    clashes = {s: [v for v, t in zip(raw, ids, strict=True) if t == s] for s, n in Counter(ids).items() if n > 1}
    if clashes:
        raise PsyfaceError(f"{where}: different ids become the same file name: {dict(list(clashes.items())[:10])}")
    return ids


def canonical_table(plan: ImportPlan, ids: list[str]) -> pd.DataFrame:
    """ratings.csv: id, attributes (as written), categories (blank -> "unknown"), source_id."""
    table = pd.DataFrame({"id": ids})
    for column in plan.attributes:
        table[column] = plan.table[column].to_numpy()
    for column in [*plan.sensitive, *plan.labels]:
        table[column] = plan.table[column].fillna(UNKNOWN).to_numpy()
    declared = {plan.id_column, *plan.attributes, *plan.sensitive, *plan.labels}
    for column in plan.table.columns:
        if column not in declared and column not in table.columns:
            table[column] = plan.table[column].to_numpy()
    table[SOURCE_ID] = plan.table[plan.id_column].to_numpy()
    return table


def categories(values: pd.Series) -> list[str]:
    """Declared categories in a stable order: numbers numerically, then text, "unknown" last."""
    unique = set(values.fillna(UNKNOWN))
    return sorted(unique, key=lambda v: (v == UNKNOWN, not is_number(v), float(v) if is_number(v) else 0.0, v))


# ---------------------------------------------------------------------------------------- writing
def convert_images(plan: ImportPlan, ids: list[str], images_out: Path) -> dict[str, str]:
    """Write images/{id}.png for every decodable source; return {id: problem} for the others."""
    images_out.mkdir(parents=True, exist_ok=True)
    problems = {}
    raw_ids = plan.table[plan.id_column].tolist()
    for image_id, raw in tqdm(list(zip(ids, raw_ids, strict=True)), desc="import images", unit="img", disable=None):
        source = plan.images_dir / plan.filename_template.format(id=raw)
        try:
            image = decode_image(source, min_side=1)
        except ImageProblem as problem:
            problems[image_id] = f"{problem.reason}: {problem}"
            continue
        image.save(images_out / f"{image_id}.png", "PNG")
    return problems


def unused_images(plan: ImportPlan) -> list[str]:
    """Image files in the source folder that no row names (listed in the summary, not imported)."""
    named = {(plan.images_dir / plan.filename_template.format(id=v)).resolve() for v in plan.table[plan.id_column]}
    return sorted(
        p.name
        for p in plan.images_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in named
    )


def write_dataset(plan: ImportPlan, out: Path, force: bool) -> str:
    """Write the canonical layout into `out` (built under a temporary name, then swapped in); return the summary."""
    where = str(plan.source.get("ratings", plan.name))
    require_columns(plan.table, [plan.id_column, *plan.sensitive, *plan.labels], where)
    if not plan.attributes:
        columns = list(plan.table.columns)
        raise PsyfaceError(f"{where}: no numeric column left to use as an attribute; columns found: {columns}")
    if not plan.images_dir.is_dir():
        raise PsyfaceError(f"images folder {plan.images_dir} not found")
    if out.is_file():
        raise PsyfaceError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise PsyfaceError(f"{out} exists and is not empty; pass --force to replace it")
    ids = check_ids(plan.table, plan.id_column, plan.images_dir, plan.filename_template, where)
    table = canonical_table(plan, ids)
    problems: dict[str, str] = {}

    def fill(folder: Path) -> None:
        problems.update(convert_images(plan, ids, folder / "images"))
        table.to_csv(folder / "ratings.csv", index=False)
        dataset_spec(plan, problems, out).write(folder)

    replace_dir_atomic(out, fill)
    spec = dataset_spec(plan, problems, out)
    return summary(plan, spec, len(table), problems, unused_images(plan), out)


def dataset_spec(plan: ImportPlan, problems: dict[str, str], out: Path) -> DatasetSpec:
    """dataset.yaml's content: declared columns, one scale, reliability unknown, import problems."""
    return DatasetSpec(
        name=plan.name,
        attributes={name: Attribute(scale=plan.scale) for name in plan.attributes},
        sensitive_features={c: categories(plan.table[c]) for c in plan.sensitive},
        labels={c: categories(plan.table[c]) for c in plan.labels},
        reliability={},
        source={**plan.source, "import_problems": dict(problems)},
        root=out,
    )


def summary(
    plan: ImportPlan, spec: DatasetSpec, rows: int, problems: dict[str, str], unused: list[str], out: Path
) -> str:
    def listing(names: dict[str, list[str]]) -> str:
        return ", ".join(f"{k} ({len(v)} categories)" for k, v in names.items()) or "none"

    lines = [
        f"imported {rows} rows from {plan.source.get('ratings')} into {out}/",
        f"  attributes: {', '.join(plan.attributes)}; scale {list(plan.scale)}",
        f"  sensitive features: {listing(spec.sensitive_features)}",
        f"  labels: {listing(spec.labels)}",
        *(f"  note: {note}" for note in plan.notes),
        f"  images: {rows - len(problems)} written as PNG to {out}/images/, {len(problems)} not imported",
        *(f"    {image_id}: {problem}" for image_id, problem in list(problems.items())[:10]),
        f"  image files in {plan.images_dir} with no row (not imported): {len(unused)}"
        + (f", e.g. {unused[:5]}" if unused else ""),
        "  reliability: unknown (dataset.yaml reliability left empty)",
    ]
    if problems:
        lines.append("  the rows of images not imported stay in ratings.csv: `psyface validate` reports them")
    return "\n".join([*lines, "next: dvc add data"])


# --------------------------------------------------------------------------------------- commands
def generic_plan(args: argparse.Namespace) -> ImportPlan:
    path = Path(args.ratings)
    table = read_ratings_table(path, args.sheet)
    named = [args.id_column, *args.sensitive, *args.labels]
    require_columns(table, named, str(path))
    attributes, labels, notes = classify_columns(table, set(named))
    labels = [*args.labels, *labels]
    notes = [
        f"columns not named on the command line: numeric -> attributes {attributes}, "
        f"non-numeric -> labels {[c for c in labels if c not in args.labels]}",
        *notes,
    ]
    if args.scale:
        scale = (float(args.scale[0]), float(args.scale[1]))
    elif attributes:
        scale = inferred_scale(table, attributes)
        notes.append(f"scale {list(scale)} inferred from the data; pass --scale LO HI to set it")
    else:
        scale = (0.0, 1.0)
    return ImportPlan(
        name=args.name or path.stem,
        table=table,
        id_column=args.id_column,
        images_dir=Path(args.images),
        filename_template=args.filename_template,
        attributes=attributes,
        sensitive=list(args.sensitive),
        labels=labels,
        scale=scale,
        notes=notes,
        source={"importer": "generic", "images": str(args.images), "ratings": str(path), "sheet": args.sheet},
    )


def parse_codes(text: str) -> dict[str, str]:
    """"1=white,2=black" -> {"1": "white", "2": "black"}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise PsyfaceError(f"--race-codes must look like '1=white,2=black', got {text!r}")
    return {code.strip(): name.strip() for code, name in pairs}


def us10k_plan(args: argparse.Namespace) -> ImportPlan:
    root = Path(args.root)
    if not root.is_dir():
        raise PsyfaceError(f"{root} is not a folder (expected the 10k US Adult Faces root)")
    attributes_file, demographics_file = root / args.attributes_file, root / args.demographics_file
    ratings = read_ratings_table(attributes_file, args.attributes_sheet)
    require_columns(ratings, [args.filename_column], f"{attributes_file} sheet {args.attributes_sheet!r}")
    demographics = read_ratings_table(demographics_file, args.demographics_sheet)
    wanted = [args.filename_column, *args.sensitive, *args.labels]
    require_columns(demographics, wanted, f"{demographics_file} sheet {args.demographics_sheet or 'first'}")
    attributes = [c for c in ratings.columns if c != args.filename_column and ratings[c].map(is_number).any()]
    table = ratings[[args.filename_column, *attributes]].merge(
        demographics[wanted].drop_duplicates(args.filename_column), on=args.filename_column, how="left"
    )
    codes = parse_codes(args.race_codes)
    notes = [f"attributes: every numeric column of sheet {args.attributes_sheet!r}"]
    if args.race_column in table.columns:
        unmapped = sorted(set(table[args.race_column].dropna()) - set(codes))
        table[args.race_column] = table[args.race_column].map(lambda v: codes.get(v, v) if isinstance(v, str) else v)
        notes.append(f"{args.race_column} codes mapped with --race-codes {args.race_codes!r}")
        if unmapped:
            notes.append(f"{args.race_column} codes with no name kept as they are: {unmapped}")
    missing = int((~table[args.filename_column].isin(demographics[args.filename_column])).sum())
    if missing:
        notes.append(f"{missing} face(s) have no demographic row: their categories are {UNKNOWN!r}")
    return ImportPlan(
        name=args.name,
        table=table,
        id_column=args.filename_column,
        images_dir=root / US10K_IMAGES,
        filename_template="{id}",
        attributes=attributes,
        sensitive=list(args.sensitive),
        labels=list(args.labels),
        scale=(float(args.scale[0]), float(args.scale[1])),
        notes=notes,
        source={
            "importer": "us10k",
            "root": str(root),
            "ratings": f"{attributes_file} [{args.attributes_sheet}]",
            "demographics": str(demographics_file),
            "race_codes": codes,
        },
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="psyface import", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="layout", required=True)
    generic = sub.add_parser("generic", help="a folder of images plus a .csv/.xlsx ratings table")
    generic.add_argument("--images", required=True, help="folder with the face images")
    generic.add_argument("--ratings", required=True, help="ratings table (.csv UTF-8 or .xlsx)")
    generic.add_argument("--id-column", required=True, help="column identifying each image")
    generic.add_argument("--filename-template", default="{id}.jpg", help="image file name from the id")
    generic.add_argument("--sensitive", nargs="+", action="extend", help="columns that are sensitive features")
    generic.add_argument("--labels", nargs="+", action="extend", help="columns that are labels (numeric or not)")
    generic.add_argument("--sheet", help="sheet of an .xlsx table (default: the first)")
    generic.add_argument("--scale", nargs=2, type=float, metavar=("LO", "HI"), help="rating scale (default: inferred)")
    generic.add_argument("--name", help="dataset name (default: the ratings file name)")
    us10k = sub.add_parser("us10k", help="the 10k US Adult Faces Database folder")
    option = us10k.add_argument
    option("root", help="the database folder (contains 'Face Images/')")
    option("--attributes-file", default=US10K_ATTRIBUTES, help="mean ratings workbook under ROOT (%(default)s)")
    option("--attributes-sheet", default="Final Values", help="sheet of mean ratings per face (%(default)s)")
    option("--demographics-file", default=US10K_DEMOGRAPHICS, help="demographic labels workbook (%(default)s)")
    option("--demographics-sheet", help="sheet of demographic labels (default: the first)")
    option("--filename-column", default="Filename", help="image file name column, both workbooks (%(default)s)")
    option("--sensitive", nargs="+", action="extend", help="sensitive feature columns (Gender Race Age)")
    option("--labels", nargs="+", action="extend", help="label columns (Emotion)")
    option("--race-column", default="Race", help="column whose codes --race-codes names (%(default)s)")
    option("--race-codes", default=US10K_RACE_CODES, help="code=name pairs, comma separated (%(default)s)")
    option("--scale", nargs=2, type=float, default=[1.0, 9.0], metavar=("LO", "HI"), help="rating scale (1 9)")
    option("--name", default="us10k", help="dataset name (%(default)s)")
    for command in (generic, us10k):
        command.add_argument("--out", default=str(DATA_DIR), help="output folder (default: data)")
        command.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return top


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    defaults = US10K_COLUMNS if args.layout == "us10k" else {"sensitive": [], "labels": []}
    for option, default in defaults.items():
        setattr(args, option, getattr(args, option) or default)
    if args.scale and not args.scale[0] < args.scale[1]:
        raise PsyfaceError(f"--scale must be LO HI with LO < HI, got {args.scale}")
    plan = generic_plan(args) if args.layout == "generic" else us10k_plan(args)
    print(write_dataset(plan, Path(args.out), args.force))
    return 0


if __name__ == "__main__":
    main()

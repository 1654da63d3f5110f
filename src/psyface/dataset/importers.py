"""`psyface import generic|us10k`: bring a rated face collection into the canonical `data/` layout.

Images keep the lab's bytes: a file that decodes to 8-bit RGB as it is (baseline or progressive JPEG,
8-bit RGB PNG) is stored as itself, `images/{id}.jpg|png` (hard-linked where the file system allows,
else copied; `--copy` always copies). Only files that need converting (CMYK, 16-bit, palette, alpha,
grey, EXIF-rotated, other formats) are decoded through the shared loader (`psyface.images`) and
written as 8-bit RGB PNG; the summary counts each kind. Every file is decoded once here, in parallel,
so a broken one is caught now; `prepare` decodes again into its array, so nothing downstream changes.
A file that cannot be decoded (or is missing) is not written; its row stays in `ratings.csv` and the
reason is recorded in `dataset.yaml` under `source.import_problems`, so `psyface validate` reports it
and nothing disappears silently. Size rules (`validate.min_image_side`) are left to validate.

Tables are read as spreadsheets export them: the CSV delimiter (comma, semicolon, tab) is detected,
and a column written entirely with decimal commas is read as numbers. Ids become file-name-safe:
characters outside `[A-Za-z0-9._-]` turn into `_`, a trailing image extension is dropped; the
original id is kept in the `source_id` column. Rating cells are copied as written, so validate can
name a bad one. Reliability comes from the raw per-rating table (`--ratings-long`, split-half, see
`psyface.reliability`) or a table of published values (`--reliability`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageOps

from psyface.arguments import non_negative_int, positive_int
from psyface.dataset.layout import DATA_DIR, Attribute, DatasetSpec
from psyface.dataset.reliability import (
    LongColumns,
    clean_long,
    face_means,
    mean_disagreements,
    read_reliability_table,
    reliabilities,
)
from psyface.errors import PsyfaceError, entry_point, not_utf8
from psyface.parallel import process_map, usable_cores
from psyface.images import ImageProblem, open_image, to_rgb
from psyface.io import output_folder, replace_dir_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
UNKNOWN = "unknown"
SOURCE_ID = "source_id"
IMAGE_TEMPLATE = "images/{id}.{ext}"
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # stored as the original file when already 8-bit RGB
CONVERT_REASONS = {"CMYK": "CMYK", "P": "palette", "PA": "palette", "RGBA": "alpha", "LA": "alpha", "La": "alpha",
                   "RGBa": "alpha", "L": "grey", "1": "grey", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
                   "I": "16-bit"}
EXIF_ORIENTATION = 0x0112

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
    reliability: dict[str, float] = field(default_factory=dict)
    reliability_lines: list[str] = field(default_factory=list)  # how the reliability was found, for the summary
    copy: bool = False  # always copy kept originals (never hard-link)


# --------------------------------------------------------------------------------------- reading
def as_text(value: Any) -> Any:
    """A cell as the text a person would read (1.0 from Excel -> "1"); blanks stay NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text if text else math.nan


def read_ratings_table(path: Path, sheet: str | None = None, id_column: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """A .csv (UTF-8, delimiter detected) or .xlsx sheet as a text table, and notes saying what was
    detected; each way it can fail names the file. Decimal commas are read where a whole column
    uses them (never in `id_column`)."""
    if not path.is_file():
        raise PsyfaceError(f"ratings table {path} not found")
    suffix = path.suffix.lower()
    notes = []
    if suffix in (".csv", ".tsv", ".txt"):
        if sheet is not None:
            raise PsyfaceError(f"--sheet applies to .xlsx files, but {path} is a CSV")
        table, delimiter = read_delimited(path, id_column)
        notes.append(f"{path.name}: delimiter {DELIMITERS[delimiter]} ({delimiter!r}) detected")
    elif suffix == ".xlsx":
        table = read_sheet(path, sheet)
    else:
        raise PsyfaceError(f"{path}: ratings must be a .csv or .xlsx file, got {suffix or 'no extension'!r}")
    table = table.map(as_text).dropna(how="all")
    if table.empty:
        raise PsyfaceError(f"{path}{f' sheet {sheet!r}' if sheet else ''} has no data rows: nothing to import")
    table.columns = [str(c).strip() for c in table.columns]
    table, converted = read_decimal_commas(table, exclude={id_column} if id_column else set())
    if converted:
        notes.append(f"{path.name}: decimal commas read in column(s) {converted}")
    return table.reset_index(drop=True), notes


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a spreadsheet's byte-order mark dropped); other encodings are named."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None


def field_counts(text: str, delimiter: str) -> list[int]:
    """Fields per non-blank line when `text` is read with `delimiter` (quotes respected)."""
    try:
        return [len(row) for row in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in row)]
    except csv.Error:
        return []


def detect_delimiter(text: str, where: str, id_column: str | None = None) -> str:
    """The one delimiter under which every line has the header's number of fields (more than one).

    Several such readings are narrowed to those whose header has `id_column`; if still more than
    one, the table is ambiguous and the error shows each reading's columns.
    """
    readings = {}
    for delimiter in DELIMITERS:
        counts = field_counts(text, delimiter)
        if counts and counts[0] > 1 and all(n == counts[0] for n in counts):
            readings[delimiter] = next(csv.reader(io.StringIO(text), delimiter=delimiter))
    if id_column and len(readings) > 1:
        readings = {d: header for d, header in readings.items() if id_column in [h.strip() for h in header]} or readings
    if len(readings) == 1:
        return next(iter(readings))
    if readings:
        both = "; ".join(f"as {DELIMITERS[d]}-separated: columns {header}" for d, header in readings.items())
        raise PsyfaceError(f"{where}: ambiguous table, it reads two ways ({both}); "
                           "re-export it with one delimiter that no cell contains, or quote the cells")
    return ","  # one column, or ragged under every delimiter: read as CSV, so the errors name columns


def read_delimited(path: Path, id_column: str | None) -> tuple[pd.DataFrame, str]:
    """A delimited text table (all cells as text) and its detected delimiter."""
    text = read_text(path)
    if not text.strip():
        raise PsyfaceError(f"{path} is empty: expected a header line and one row per image")
    delimiter = detect_delimiter(text, str(path), id_column)
    try:
        table = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=True)
    except pd.errors.ParserError as error:
        raise PsyfaceError(f"cannot parse {path}: {error}") from None
    return table, delimiter


DECIMAL_COMMA = re.compile(r"^[+-]?\d+(,\d+)?$")


def read_decimal_commas(table: pd.DataFrame, exclude: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """Columns whose every non-empty cell is a number written with a decimal comma (or an integer),
    at least one with the comma, become dot-decimal text; returns the table and those columns."""
    converted = []
    table = table.copy()
    for column in table.columns:
        if column in exclude:
            continue
        values = table[column].dropna().astype(str)
        if len(values) and values.str.match(DECIMAL_COMMA).all() and values.str.contains(",").any():
            table[column] = table[column].map(lambda v: v.replace(",", ".") if isinstance(v, str) else v)
            converted.append(column)
    return table, converted


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


def is_plain_name(raw: str) -> bool:
    """The path-safety rule for ids: no absolute path, no `..`, no separator (only the template may
    add folders). Where a symlinked image folder points is not the id's business, so not checked."""
    return not (raw.startswith(("/", "\\")) or Path(raw).is_absolute() or ".." in raw.replace("\\", "/").split("/")
                or "/" in raw or "\\" in raw)


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
    template_parts = template.replace("\\", "/").split("/")
    if Path(template).is_absolute() or ".." in template_parts or "{id}" not in template:
        raise PsyfaceError(f"--filename-template {template!r} must contain {{id}} and name a file inside the images folder")
    escaping = [(i + 2, v) for i, v in enumerate(raw) if not is_plain_name(v)]
    if escaping:
        raise PsyfaceError(
            f"{where}: id(s) that are not plain names (absolute, '..' or a path separator), so their "
            f"image would lie outside {images_dir}: " + ", ".join(f"line {line} {v!r}" for line, v in escaping[:10])
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
def conversion_reason(image: Image.Image) -> str | None:
    """Why a decoded file cannot be stored as it is (None: it is 8-bit RGB JPEG/PNG, kept)."""
    if image.format not in KEPT_FORMATS:
        return f"{image.format or 'unknown'} format"
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return "EXIF-rotated"
    if image.mode != "RGB":
        return CONVERT_REASONS.get(image.mode, f"mode {image.mode}")
    return None


def store_image(source: Path, folder: Path, image_id: str, copy: bool) -> tuple[str, str]:
    """Store one source image under `folder` -> (kind, detail): ("kept", "jpg linked"|"png copied"...),
    ("converted", reason) or ("problem", "reason: message"). Runs in a worker process."""
    try:
        image = open_image(source, min_side=1, reduced=True)
        reason = conversion_reason(image)
        if reason is None:
            suffix = KEPT_FORMATS[image.format]
            return "kept", f"{suffix} {keep_file(source, folder / f'{image_id}.{suffix}', copy)}"
        if image.format == "JPEG":  # decoded at 1/8 scale for the check: decode fully to convert
            image = open_image(source, min_side=1)
        to_rgb(ImageOps.exif_transpose(image)).save(folder / f"{image_id}.png", "PNG")
        return "converted", reason
    except ImageProblem as problem:
        return "problem", f"{problem.reason}: {problem}"


def keep_file(source: Path, target: Path, copy: bool) -> str:
    """Hard-link `source` (its real file, through symlinks) to `target`, else copy it; say which."""
    if not copy:
        try:
            os.link(source.resolve(), target)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(source, target)
    return "copied"


def import_images(plan: ImportPlan, ids: list[str], images_out: Path, workers: int) -> tuple[Counter, dict[str, str]]:
    """Store every row's image in `images_out` on `workers` processes -> (counts of what was kept or
    converted and why, {id: problem} for the images that could not be imported)."""
    images_out.mkdir(parents=True, exist_ok=True)
    raw_ids = plan.table[plan.id_column].tolist()
    sources = [plan.images_dir / plan.filename_template.format(id=raw) for raw in raw_ids]
    jobs = [(source, images_out, image_id, plan.copy) for source, image_id in zip(sources, ids, strict=True)]
    results = process_map(store_image, jobs, workers,
                          {"desc": "import images", "unit": "img", "disable": None}, chunksize=8)
    counts: Counter = Counter()
    problems = {}
    for image_id, (kind, detail) in zip(ids, results, strict=True):
        if kind == "problem":
            problems[image_id] = detail
        else:
            counts[f"{kind}: {detail}"] += 1
    return counts, problems


def unused_images(plan: ImportPlan) -> list[str]:
    """Image files in the source folder that no row names (listed in the summary, not imported)."""
    named = {(plan.images_dir / plan.filename_template.format(id=v)).resolve() for v in plan.table[plan.id_column]}
    return sorted(
        p.name
        for p in plan.images_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in named
    )


def write_dataset(plan: ImportPlan, out: Path, force: bool, workers: int | None = None) -> str:
    """Write the canonical layout into `out` (built under a temporary name, then swapped in); return the summary."""
    where = str(plan.source.get("ratings", plan.name))
    require_columns(plan.table, [plan.id_column, *plan.sensitive, *plan.labels], where)
    if not plan.attributes:
        columns = list(plan.table.columns)
        raise PsyfaceError(f"{where}: no numeric column left to use as an attribute; columns found: {columns}")
    if not plan.images_dir.is_dir():
        raise PsyfaceError(f"images folder {plan.images_dir} not found")
    if output_folder(out).exists() and any(out.iterdir()) and not force:
        raise PsyfaceError(f"{out} exists and is not empty; pass --force to replace it")
    unknown = sorted(set(plan.reliability) - set(plan.attributes))
    if unknown:
        raise PsyfaceError(f"reliability given for {unknown}, which are not attributes of this import {plan.attributes}")
    ids = check_ids(plan.table, plan.id_column, plan.images_dir, plan.filename_template, where)
    table = canonical_table(plan, ids)
    problems: dict[str, str] = {}
    counts: Counter = Counter()

    def fill(folder: Path) -> None:
        stored, failed = import_images(plan, ids, folder / "images", workers or usable_cores())
        counts.update(stored)
        problems.update(failed)
        table.to_csv(folder / "ratings.csv", index=False)
        dataset_spec(plan, problems, out).write(folder)

    replace_dir_atomic(out, fill)
    spec = dataset_spec(plan, problems, out)
    return summary(plan, spec, len(table), counts, problems, unused_images(plan), out)


def dataset_spec(plan: ImportPlan, problems: dict[str, str], out: Path) -> DatasetSpec:
    """dataset.yaml's content: declared columns, one scale, reliability (where known), import problems."""
    return DatasetSpec(
        name=plan.name,
        attributes={name: Attribute(scale=plan.scale) for name in plan.attributes},
        image_template=IMAGE_TEMPLATE,
        sensitive_features={c: categories(plan.table[c]) for c in plan.sensitive},
        labels={c: categories(plan.table[c]) for c in plan.labels},
        reliability={name: plan.reliability[name] for name in plan.attributes if name in plan.reliability},
        source={**plan.source, "import_problems": dict(problems)},
        root=out,
    )


def summary(
    plan: ImportPlan, spec: DatasetSpec, rows: int, counts: Counter, problems: dict[str, str], unused: list[str],
    out: Path,
) -> str:
    def listing(names: dict[str, list[str]]) -> str:
        return ", ".join(f"{k} ({len(v)} categories)" for k, v in names.items()) or "none"

    kept = sum(n for kind, n in counts.items() if kind.startswith("kept"))
    unknown = [name for name in plan.attributes if name not in spec.reliability]
    lines = [
        f"imported {rows} rows from {plan.source.get('ratings')} into {out}/",
        f"  attributes: {', '.join(plan.attributes)}; scale {list(plan.scale)}",
        f"  sensitive features: {listing(spec.sensitive_features)}",
        f"  labels: {listing(spec.labels)}",
        *(f"  note: {note}" for note in plan.notes),
        f"  images: {rows - len(problems)} stored in {out}/images/ ({kept} kept as the original file, "
        f"{rows - len(problems) - kept} re-encoded as PNG), {len(problems)} not imported",
        *(f"    {n} {kind}" for kind, n in sorted(counts.items())),
        *(f"    {image_id}: {problem}" for image_id, problem in list(problems.items())[:10]),
        f"  image files in {plan.images_dir} with no row (not imported): {len(unused)}"
        + (f", e.g. {unused[:5]}" if unused else ""),
        *plan.reliability_lines,
        f"  reliability: unknown for {unknown} (pass --ratings-long or --reliability)" if unknown
        else "  reliability: known for every attribute (dataset.yaml reliability)",
    ]
    if problems:
        lines.append("  the rows of images not imported stay in ratings.csv: `psyface validate` reports them")
    return "\n".join([*lines, "next: dvc add data"])


# --------------------------------------------------------------------------------------- commands
def with_long_ratings(
    table: pd.DataFrame | None, id_column: str, long: pd.DataFrame, args: argparse.Namespace, where: str
) -> tuple[pd.DataFrame, dict[str, float], dict[str, Any], list[str]]:
    """Means and split-half reliability from a long per-rating table -> (mean table with the means
    of attributes it lacked added, or built from them; reliability; its record for dataset.yaml
    `source.reliability`; summary lines). Means the table gives are checked against the ratings."""
    columns = LongColumns(args.long_id_column or id_column, args.attribute_column, args.rating_column,
                          args.rater_column, args.trial_type_column)
    named = [c for c in (columns.id, columns.attribute, columns.rating, columns.rater, columns.trial_type) if c]
    require_columns(long, named, where)
    clean, notes = clean_long(long, columns, args.keep_trial_types or [], where)
    means = face_means(clean)
    as_text_means = means.map(lambda v: math.nan if pd.isna(v) else f"{v:.10g}")
    if table is None:
        table = as_text_means.rename_axis(id_column).reset_index()
    else:
        disagreements = mean_disagreements(table, id_column, means)
        if disagreements:
            raise PsyfaceError(f"the mean table disagrees with the means of {where} in {len(disagreements)} cell(s): "
                               + "; ".join(disagreements[:10]))
        added = [c for c in means.columns if c not in table.columns]
        if added:
            table = table.merge(as_text_means[added], left_on=id_column, right_index=True, how="left")
            notes.append(f"means of {added} computed from the ratings (not in the mean table)")
        unrated = int((~table[id_column].isin(means.index)).sum())
        extra = int((~means.index.isin(table[id_column])).sum())
        if unrated:
            notes.append(f"{unrated} face(s) of the mean table have no rating in {where}")
        if extra:
            notes.append(f"{extra} face(s) rated in {where} have no row in the mean table: not imported")
    found = reliabilities(clean, args.reliability_splits, args.reliability_seed)
    lines = [f"  ratings: {len(clean)} from {where}" + "".join(f"; {note}" for note in notes)]
    for attribute, value in found.items():
        low, high, mean = value.ratings_per_face
        lines.append(
            f"  reliability {attribute}: {value.reliability:.3f} (split-half, Spearman-Brown; SD {value.sd:.3f} over "
            f"{value.splits} splits, 95 % of splits {value.low:.3f}-{value.high:.3f}); {value.faces} faces with "
            f"{low}-{high} ratings (mean {mean:.1f})"
            + (f"; {value.too_few} face(s) with fewer than 2 ratings not used" if value.too_few else "")
        )
    record = {"method": "split-half within faces, Spearman-Brown corrected", "ratings_long": where,
              "seed": args.reliability_seed, "attributes": {a: v.as_dict() for a, v in found.items()}}
    return table, {a: round(v.reliability, 4) for a, v in found.items()}, record, lines


def reliability_evidence(
    table: pd.DataFrame | None, id_column: str, args: argparse.Namespace
) -> tuple[pd.DataFrame | None, dict[str, float], dict[str, Any], list[str]]:
    """The --ratings-long or --reliability evidence (neither: the table as it is, nothing known)."""
    if args.ratings_long:
        path = Path(args.ratings_long)
        long, _ = read_ratings_table(path, args.long_sheet, args.long_id_column or id_column)
        return with_long_ratings(table, id_column, long, args, str(path))
    if args.reliability:
        path = Path(args.reliability)
        values = read_reliability_table(read_ratings_table(path)[0], str(path))
        lines = [f"  reliability: {', '.join(f'{a}={v:.3f}' for a, v in values.items())} from {path}"]
        return table, values, {"method": "given", "file": str(path)}, lines
    return table, {}, {}, []


def generic_plan(args: argparse.Namespace) -> ImportPlan:
    if not args.ratings and not args.ratings_long:
        raise PsyfaceError("give --ratings (a mean table), --ratings-long (one row per rating), or both")
    path = Path(args.ratings or args.ratings_long)
    table, read_notes = read_ratings_table(path, args.sheet, args.id_column) if args.ratings else (None, [])
    table, reliability, record, reliability_lines = reliability_evidence(table, args.id_column, args)
    assert table is not None  # with no --ratings, --ratings-long built it
    named = [args.id_column, *args.sensitive, *args.labels]
    require_columns(table, named, str(path))
    attributes, labels, notes = classify_columns(table, set(named))
    labels = [*args.labels, *labels]
    notes = [
        *read_notes,
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
        source={"importer": "generic", "images": str(args.images), "ratings": str(path), "sheet": args.sheet,
                **({"reliability": record} if record else {})},
        reliability=reliability,
        reliability_lines=reliability_lines,
        copy=args.copy,
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
    ratings, _ = read_ratings_table(attributes_file, args.attributes_sheet, args.filename_column)
    require_columns(ratings, [args.filename_column], f"{attributes_file} sheet {args.attributes_sheet!r}")
    demographics, _ = read_ratings_table(demographics_file, args.demographics_sheet, args.filename_column)
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
    if args.rater_sheet:
        sheet, _ = read_ratings_table(attributes_file, args.rater_sheet, args.filename_column)
        if args.attribute_column not in sheet.columns:  # wide: one row per rater and face, a column per attribute
            require_columns(sheet, [args.filename_column], f"{attributes_file} sheet {args.rater_sheet!r}")
            keep = [c for c in (args.filename_column, args.rater_column, args.trial_type_column) if c]
            sheet = sheet.melt(id_vars=keep, value_vars=[c for c in attributes if c in sheet.columns],
                               var_name=args.attribute_column, value_name=args.rating_column)
        table, reliability, record, lines = with_long_ratings(table, args.filename_column, sheet, args,
                                                              f"{attributes_file} [{args.rater_sheet}]")
    else:
        table, reliability, record, lines = reliability_evidence(table, args.filename_column, args)
    assert table is not None
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
            **({"reliability": record} if record else {}),
        },
        reliability=reliability,
        reliability_lines=lines,
        copy=args.copy,
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="psyface import", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="layout", required=True)
    generic = sub.add_parser("generic", help="a folder of images plus a .csv/.xlsx ratings table")
    generic.add_argument("--images", required=True, help="folder with the face images")
    generic.add_argument("--ratings", help="mean ratings table (.csv UTF-8, any delimiter, or .xlsx)")
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
    option("--rater-sheet", help="per-rater sheet of the attributes workbook (long, or one row per rater and face "
                                 "with a column per attribute): means checked, split-half reliability computed")
    for command in (generic, us10k):
        add = command.add_argument
        evidence = command.add_mutually_exclusive_group()
        evidence.add_argument("--ratings-long", help="one row per rating (.csv/.xlsx): means and split-half reliability")
        evidence.add_argument("--reliability", help="published reliabilities (.csv/.xlsx): columns attribute, reliability")
        add("--long-sheet", help="sheet of an .xlsx --ratings-long (default: the first)")
        add("--long-id-column", help="face column of the long table (default: the id column)")
        add("--attribute-column", default="attribute", help="attribute column of the long table (%(default)s)")
        add("--rating-column", default="rating", help="rating column of the long table (%(default)s)")
        add("--rater-column", help="rater column of the long table (optional: raters counted)")
        add("--trial-type-column", help="trial-type column of the long table (optional)")
        add("--keep-trial-types", nargs="+", action="extend", help="trial types whose ratings count (default: all)")
        add("--reliability-splits", type=positive_int, default=200, help="random split-halves per attribute (%(default)s)")
        add("--reliability-seed", type=non_negative_int, default=0, help="seed of the split-halves (%(default)s)")
        add("--copy", action="store_true", help="copy kept images (default: hard-link where possible)")
        add("--workers", type=positive_int, help="decoding processes (default: every core)")
        add("--out", default=str(DATA_DIR), help="output folder (default: data)")
        add("--force", action="store_true", help="replace a non-empty output folder")
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
    print(write_dataset(plan, Path(args.out), args.force, args.workers))
    return 0


if __name__ == "__main__":
    main()

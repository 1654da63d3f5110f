"""Stage `validate`: check `data/` against its own `dataset.yaml` before anything trains on it.

The table rules are a Great Expectations (Core 1.x) suite built from `dataset.yaml`. GX has no image
expectations, so each row's image is checked here through the one image loader (`psyface.images`)
and the outcome becomes a column (`image_status`) that the suite expects to be "ok". Every failing
row is either a hard failure (`on_bad_rows: fail`) or quarantined with its rule and reason
(`on_bad_rows: quarantine`); either way the counts are in the summary, so nothing is dropped silently.
Problems with the table as a whole (a declared column missing, no rows) fail under both policies.

Outputs: reports/validation/{summary.json, gx_result.json, quarantine.csv}, artifacts/validate/clean.csv.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm import tqdm

from psyface.config import PositiveInt, load_section
from psyface.dataset.layout import DATA_DIR, IMAGE_EXTENSIONS, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.images import ImageProblem, decode_image
from psyface.io import read_csv_checked, write_csv_atomic, write_json_atomic

REPORTS_DIR = Path("reports/validation")
ARTIFACTS_DIR = Path("artifacts/validate")
QUARANTINE_FIELDS = ["id", "file", "rule", "message"]
IMAGE_STATUS = "image_status"
IMAGE_REASONS = ("no_id", "unsafe_id", "missing_file", "undecodable", "too_small", "too_many_pixels")
NUMBER_PATTERN = r"^\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*$"
SHOWN_IN_ERROR = 10
VOLATILE_GX_KEYS = {"ge_load_time", "validation_id", "checkpoint_id", "run_time", "validation_time"}


@dataclass(frozen=True)
class ValidateParams:
    """`params.yaml:validate`: what to do with bad rows, and the smallest usable image side."""

    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    min_image_side: PositiveInt = 32


@dataclass(frozen=True)
class Finding:
    """One row (or file) breaking one rule: a line of quarantine.csv."""

    id: str
    file: str
    rule: str
    message: str


@dataclass
class ValidationOutcome:
    """Everything the stage learned; `write_reports` turns it into files."""

    dataset: str
    n_rows: int
    ids: list[str | None]
    findings: list[Finding]
    failing_rows: set[int]
    table_problems: list[str]
    rule_counts: dict[str, int]
    orphan_images: list[str]
    gx_result: dict[str, Any]
    min_image_side: int

    @property
    def clean_ids(self) -> list[str]:
        return [i for row, i in enumerate(self.ids) if row not in self.failing_rows and i is not None]

    @property
    def all_clean(self) -> bool:
        return not self.table_problems and not self.failing_rows


# ----------------------------------------------------------------------------------------- reading
def read_table(spec: DatasetSpec) -> pd.DataFrame:
    """The ratings table with every cell as text (NaN when empty), so the rules see what was written."""
    path = spec.ratings_path
    table = read_csv_checked(path, dtype=str, keep_default_na=True)
    if table.empty:
        raise PsyfaceError(f"{path} has a header but no rows: nothing to validate")
    return table.reset_index(drop=True)


def declared_columns(spec: DatasetSpec) -> list[str]:
    """Every column `dataset.yaml` promises, in a stable order."""
    columns = [spec.id_column, *spec.attributes, *spec.sensitive_features, *spec.labels]
    if spec.identity_column:
        columns.append(spec.identity_column)
    return list(dict.fromkeys(columns))


def is_plain_file_name(image_id: str) -> bool:
    """True for ids that name a file, not a path: no separators, no leading dot, no NUL."""
    return bool(image_id) and not any(c in image_id for c in "/\\\0") and not image_id.startswith(".")


# ------------------------------------------------------------------------------------------ images
def image_file(spec: DatasetSpec, image_id: str) -> Path:
    """A row's image as the user names it (under the dataset folder as given, not resolved)."""
    return spec.root / spec.image_path(image_id).relative_to(spec.root.resolve())


def shown_file(spec: DatasetSpec, image_id: str | None) -> str:
    """The image file a finding names: "" for a row whose id names no safe file."""
    if image_id is None or not is_plain_file_name(image_id):
        return ""
    try:
        return str(image_file(spec, image_id))
    except PsyfaceError:
        return ""


def check_image(spec: DatasetSpec, image_id: str | None, min_side: int) -> tuple[str, str]:
    """(status, message) for one row's image; status is "ok" or one of IMAGE_REASONS."""
    if image_id is None:
        return "no_id", "the row has no id, so it names no image"
    if not is_plain_file_name(image_id):
        return "unsafe_id", (
            f"id {image_id!r} is not a plain file name (path separator or leading dot): "
            f"its image could lie outside {spec.root}"
        )
    try:
        path = image_file(spec, image_id)
    except PsyfaceError as error:
        return "unsafe_id", str(error)
    try:
        decode_image(path, min_side=min_side)
    except ImageProblem as problem:
        imported = spec.source.get("import_problems", {}).get(image_id)
        return problem.reason, f"{problem}" + (f" (the import could not convert it: {imported})" if imported else "")
    return "ok", ""


def orphan_images(spec: DatasetSpec, ids: list[str | None]) -> list[str]:
    """Files in the images folder that no row names (reported, not a row failure)."""
    folder = (spec.root / spec.image_template).parent
    if not folder.is_dir():
        return []
    expected = {  # every file a row's id can name (each `{ext}` choice), wherever it resolves
        (spec.root / spec.image_template.format(id=i, ext=ext)).resolve()
        for i in ids
        if i is not None and is_plain_file_name(i)
        for ext in IMAGE_EXTENSIONS
    }
    return sorted(
        str(path)
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.resolve() not in expected
    )


# ------------------------------------------------------------------------------------------- suite
def number_column(attribute: str) -> str:
    """Name of the derived numeric copy of an attribute column (text and blanks become NaN)."""
    return f"{attribute} (as number)"


def build_frame(spec: DatasetSpec, table: pd.DataFrame, image_status: list[str]) -> pd.DataFrame:
    """The table plus the derived columns the suite checks: numeric attributes and image status."""
    frame = table.copy()
    for attribute in spec.attributes:
        if attribute in frame.columns:
            frame[number_column(attribute)] = pd.to_numeric(frame[attribute], errors="coerce")
    frame[IMAGE_STATUS] = image_status
    return frame


def build_expectations(spec: DatasetSpec, present: set[str]) -> list[Any]:
    """The GX expectations `dataset.yaml` implies; `meta.rule` names each rule in the reports.

    Value rules are added only for columns that exist: a missing column is already its own failure.
    """
    import great_expectations as gx

    expect = gx.expectations
    rules: list[Any] = [
        expect.ExpectColumnToExist(column=column, meta={"rule": f"column_present:{column}"})
        for column in declared_columns(spec)
    ]
    if spec.id_column in present:
        rules += [
            expect.ExpectColumnValuesToNotBeNull(column=spec.id_column, meta={"rule": "id_not_null"}),
            expect.ExpectColumnValuesToBeUnique(column=spec.id_column, meta={"rule": "id_unique"}),
        ]
    for name, attribute in spec.attributes.items():
        if name not in present:
            continue
        low, high = attribute.scale
        rules += [
            expect.ExpectColumnValuesToNotBeNull(column=name, meta={"rule": f"rating_present:{name}"}),
            expect.ExpectColumnValuesToMatchRegex(
                column=name, regex=NUMBER_PATTERN, meta={"rule": f"rating_numeric:{name}"}
            ),
            expect.ExpectColumnValuesToBeBetween(
                column=number_column(name),
                min_value=float(low),
                max_value=float(high),
                meta={"rule": f"rating_in_scale:{name}"},
            ),
        ]
    for name, categories in {**spec.sensitive_features, **spec.labels}.items():
        if name not in present:
            continue
        rules += [
            expect.ExpectColumnValuesToNotBeNull(column=name, meta={"rule": f"category_present:{name}"}),
            expect.ExpectColumnValuesToBeInSet(
                column=name, value_set=[str(c) for c in categories], meta={"rule": f"category_in_set:{name}"}
            ),
        ]
    rules.append(expect.ExpectColumnValuesToBeInSet(column=IMAGE_STATUS, value_set=["ok"], meta={"rule": "image"}))
    return rules


def run_suite(spec: DatasetSpec, frame: pd.DataFrame, expectations: list[Any]) -> Any:
    """Run the expectations through an ephemeral GX context: data source → asset → batch → checkpoint."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas("psyface")
        .add_dataframe_asset(spec.ratings_file)
        .add_batch_definition_whole_dataframe("all rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.name} dataset.yaml"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="validate", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


# ------------------------------------------------------------------------------------ interpreting
def row_label(spec: DatasetSpec, row: int, image_id: str | None) -> str:
    return f"row {row + 1} (line {row + 2} of {spec.ratings_path}, id {image_id!r})"


def findings_for(
    spec: DatasetSpec,
    rule: str,
    rows: list[int],
    table: pd.DataFrame,
    ids: list[str | None],
    images: dict[int, tuple[str, str]],
) -> list[Finding]:
    """Readable findings for the rows that broke `rule` (a `meta.rule` from the suite)."""
    kind, _, column = rule.partition(":")
    ratings = str(spec.ratings_path)
    positions: dict[str | None, list[int]] = {}
    for position, known in enumerate(ids):
        positions.setdefault(known, []).append(position + 1)
    out = []
    for row in rows:
        image_id = ids[row]
        where = row_label(spec, row, image_id)
        value = table.at[row, column] if column in table.columns else None
        if kind == "image":
            status, message = images[row]
            file = shown_file(spec, image_id)
            out.append(Finding(image_id or "", file, f"image:{status}", f"{where}: {message}"))
            continue
        if kind == "id_not_null":
            message = f"{where}: id column {spec.id_column!r} is empty"
        elif kind == "id_unique":
            message = f"{where}: id {image_id!r} is not unique (rows {positions[image_id]})"
        elif kind == "rating_present":
            message = f"{where}: rating {column!r} is empty"
        elif kind == "rating_numeric":
            message = f"{where}: rating {column}={value!r} is not a number"
        elif kind == "rating_in_scale":
            low, high = spec.attributes[column].scale
            message = f"{where}: rating {column}={value} is outside the declared scale [{low}, {high}]"
        elif kind == "category_present":
            message = f"{where}: {column!r} is empty"
        elif kind == "category_in_set":
            allowed = {**spec.sensitive_features, **spec.labels}[column]
            message = f"{where}: {column}={value!r} is not a declared category {allowed}"
        else:
            raise AssertionError(f"no message for rule {rule!r}")
        out.append(Finding(image_id or "", ratings, rule, message))
    return out


def interpret(
    spec: DatasetSpec,
    table: pd.DataFrame,
    ids: list[str | None],
    gx_result: Any,
    images: dict[int, tuple[str, str]],
) -> tuple[list[Finding], set[int], list[str], dict[str, int]]:
    """Turn the GX result into findings, failing row numbers, table problems and per-rule counts."""
    findings: list[tuple[int, Finding]] = []
    failing: set[int] = set()
    problems: list[str] = []
    counts: Counter[str] = Counter()
    for result in gx_result.results:
        rule = result.expectation_config.meta["rule"]
        if result.exception_info.get("raised_exception"):
            raise RuntimeError(f"GX could not evaluate {rule}: {result.exception_info['exception_message']}")
        if rule.startswith("column_present:"):
            counts[rule] = 0 if result.success else 1
            if not result.success:
                column = rule.partition(":")[2]
                problems.append(
                    f"{spec.ratings_path}: declared column {column!r} is missing; columns found: {list(table.columns)}"
                )
            continue
        rows = sorted(result.result.get("unexpected_index_list") or [])
        if rule == "image":
            for reason in IMAGE_REASONS:
                counts[f"image:{reason}"] = sum(images[r][0] == reason for r in rows)
        else:
            counts[rule] = len(rows)
        findings += zip(rows, findings_for(spec, rule, rows, table, ids, images), strict=True)
        failing.update(rows)
    ordered = [finding for _, finding in sorted(findings, key=lambda pair: (pair[0], pair[1].rule))]
    return ordered, failing, problems, dict(counts)


def validate_dataset(spec: DatasetSpec, params: ValidateParams) -> ValidationOutcome:
    """Check the dataset under `spec.root`; pure apart from reading the dataset's files."""
    table = read_table(spec)
    present = set(table.columns)
    column = table[spec.id_column] if spec.id_column in present else [None] * len(table)
    ids = [None if pd.isna(i) else str(i) for i in column]
    statuses = [
        check_image(spec, image_id, params.min_image_side)
        for image_id in tqdm(ids, desc="validate images", unit="img", disable=None)
    ]
    images = dict(enumerate(statuses))
    frame = build_frame(spec, table, [status for status, _ in statuses])
    gx_result = run_suite(spec, frame, build_expectations(spec, present))
    findings, failing, problems, counts = interpret(spec, table, ids, gx_result, images)
    return ValidationOutcome(
        dataset=spec.name,
        n_rows=len(table),
        ids=ids,
        findings=findings,
        failing_rows=failing,
        table_problems=problems,
        rule_counts=counts,
        orphan_images=orphan_images(spec, ids),
        gx_result=reproducible(gx_result.to_json_dict()),
        min_image_side=params.min_image_side,
    )


# ----------------------------------------------------------------------------------------- writing
def reproducible(gx_result: dict[str, Any]) -> dict[str, Any]:
    """The GX result without run times and random ids: the same data gives a byte-identical file."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in VOLATILE_GX_KEYS}
        return [strip(v) for v in node] if isinstance(node, list) else node

    stable = strip(gx_result)
    for result in stable.get("results", []):
        result["expectation_config"].pop("id", None)
    return stable


def summary_dict(outcome: ValidationOutcome, policy: str) -> dict[str, Any]:
    return {
        "dataset": outcome.dataset,
        "policy": policy,
        "passed": passes(outcome, policy),
        "all_rows_clean": outcome.all_clean,
        "min_image_side": outcome.min_image_side,
        "rows": {
            "total": outcome.n_rows,
            "clean": len(outcome.clean_ids),
            "failing": len(outcome.failing_rows),
        },
        "rules": dict(sorted(outcome.rule_counts.items())),
        "table_problems": outcome.table_problems,
        "failing_ids": sorted({f.id for f in outcome.findings}),
        "failing_files": sorted({f.file for f in outcome.findings if f.rule.startswith("image:") and f.file}),
        "orphan_images": {"count": len(outcome.orphan_images), "files": outcome.orphan_images},
    }


def write_reports(outcome: ValidationOutcome, policy: str, reports: Path, artifacts: Path) -> None:
    """Reports always; the clean list only when the stage succeeds (a stale one is removed)."""
    write_json_atomic(summary_dict(outcome, policy), reports / "summary.json")
    write_json_atomic(outcome.gx_result, reports / "gx_result.json")
    findings = [[f.id, f.file, f.rule, f.message] for f in outcome.findings]
    write_csv_atomic(pd.DataFrame(findings, columns=QUARANTINE_FIELDS), reports / "quarantine.csv")
    clean = artifacts / "clean.csv"
    if passes(outcome, policy):
        write_csv_atomic(pd.DataFrame({"id": outcome.clean_ids}, dtype=str), clean)
    else:
        clean.unlink(missing_ok=True)


def passes(outcome: ValidationOutcome, policy: str) -> bool:
    if outcome.table_problems or not outcome.clean_ids:
        return False
    return policy == "quarantine" or not outcome.failing_rows


def failure_message(outcome: ValidationOutcome, policy: str, reports: Path) -> str:
    """A short human summary: what failed, the first few rows/files, where the rest is."""
    if outcome.table_problems:
        head = "the ratings table does not match dataset.yaml:\n  " + "\n  ".join(outcome.table_problems)
        return head + f"\n(fails under every on_bad_rows policy; reports in {reports})"
    broken = Counter(f.rule for f in outcome.findings)
    verdict = "no row passes validation" if not outcome.clean_ids else "validation failed"
    lines = [
        f"{verdict}: {len(outcome.failing_rows)} of {outcome.n_rows} rows break "
        f"{len(broken)} rule(s): " + ", ".join(f"{rule} ({n})" for rule, n in sorted(broken.items()))
    ]
    lines += [f"  {f.rule}: {f.message}" for f in outcome.findings[:SHOWN_IN_ERROR]]
    if len(outcome.findings) > SHOWN_IN_ERROR:
        lines.append(f"  ... and {len(outcome.findings) - SHOWN_IN_ERROR} more")
    advice = "" if policy == "quarantine" else (
        "; to train on the clean rows instead, set validate.on_bad_rows: quarantine in params.yaml"
    )
    lines.append(f"all findings: {reports / 'quarantine.csv'}{advice}")
    return "\n".join(lines)


def run() -> str:
    """The stage: validate `data/`, write the reports, raise PsyfaceError unless it passes."""
    params = load_section("validate", ValidateParams)
    spec = load_dataset(DATA_DIR)
    outcome = validate_dataset(spec, params)
    write_reports(outcome, params.on_bad_rows, REPORTS_DIR, ARTIFACTS_DIR)
    if not passes(outcome, params.on_bad_rows):
        raise PsyfaceError(failure_message(outcome, params.on_bad_rows, REPORTS_DIR))
    return (
        f"validate: {outcome.n_rows} rows, {len(outcome.clean_ids)} clean, "
        f"{len(outcome.failing_rows)} quarantined ({len(outcome.findings)} findings), "
        f"{len(outcome.orphan_images)} image file(s) with no row; reports in {REPORTS_DIR}"
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="psyface validate", description="Stage: check data/ against dataset.yaml (params: validate)."
    )
    parser.parse_args(argv)
    print(run())
    return 0


if __name__ == "__main__":
    main()

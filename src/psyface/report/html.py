"""Rendering the one self-contained `reports/index.html`: every image inlined as a data URI.

The page must open offline, by e-mail or from an MLflow artifact view, so it references no file,
script or font outside itself.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import jinja2
import pandas as pd

# The sections every report has, in order: (anchor id, heading). Tests check each is present.
SECTIONS: list[tuple[str, str]] = [
    ("data", "Data and validation"),
    ("training", "Training curves"),
    ("accuracy", "Accuracy against the reliability ceiling"),
    ("explanations", "Explanations"),
    ("manifold", "Manifold structure"),
    ("fairness", "Bias audit"),
    ("lineage", "Lineage and how to reproduce"),
]


@dataclass(frozen=True)
class Figure:
    title: str
    png: bytes
    caption: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass(frozen=True)
class Table:
    """A table for people: column headings and formatted cells; `flag_column` marks rows to highlight."""

    title: str
    frame: pd.DataFrame
    flag_column: str | None = None

    @property
    def columns(self) -> list[str]:
        return [str(column) for column in self.frame.columns]

    @property
    def rows(self) -> list[tuple[bool, list[str]]]:
        flags = self.frame[self.flag_column] if self.flag_column else [False] * len(self.frame)
        return [(bool(flagged), [format_cell(value) for value in row])
                for flagged, row in zip(flags, self.frame.itertuples(index=False))]


@dataclass
class ReportContent:
    """Everything the page shows, grouped by section id (see SECTIONS)."""

    title: str
    generated_at: str
    summaries: dict[str, list[str]] = field(default_factory=dict)  # section -> short paragraphs
    figures: dict[str, list[Figure]] = field(default_factory=dict)
    tables: dict[str, list[Table]] = field(default_factory=dict)
    code: dict[str, str] = field(default_factory=dict)  # section -> preformatted block (commands)


def format_cell(value: Any) -> str:
    """Numbers to 3 significant decimals, missing values as an en dash, booleans as yes/no."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings/lists -> {'a.b.0': leaf}: shows any stage's JSON summary as a key/value table."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and any(isinstance(item, dict | list) for item in data):
        items = enumerate(data)
    else:
        return {prefix: ", ".join(map(str, data)) if isinstance(data, list) else data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def key_value_table(title: str, data: dict) -> Table:
    flat = flatten(data)
    return Table(title, pd.DataFrame({"key": list(flat), "value": [format_cell(v) for v in flat.values()]}))


def render(content: ReportContent) -> str:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("psyface.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html.j2").render(content=content, sections=SECTIONS)

"""The report page: self-contained, every section, flagged rows marked, text escaped."""

from __future__ import annotations

import base64
import math

import pandas as pd

from psyface.report import html, plots


def test_page_is_self_contained_with_every_section() -> None:
    png = plots.accuracy_against_ceiling(pd.DataFrame({"attribute": ["happy"], "pearson_r": [0.5], "ceiling": [0.9]}))
    content = html.ReportContent(title="t", generated_at="now")
    content.figures["accuracy"] = [html.Figure("accuracy", png, "a caption")]
    gaps = pd.DataFrame({"attribute": ["trustworthy", "control"], "gap": [-0.6, 0.01], "flagged": [True, False]})
    content.tables["fairness"] = [html.Table("gaps", gaps, "flagged")]
    content.tables["data"] = [html.Table("hostile", pd.DataFrame({"name": ["<script>alert(1)</script>"]}))]
    content.code["lineage"] = "dvc repro"
    page = html.render(content)

    for anchor, heading in html.SECTIONS:
        assert f'<section id="{anchor}">' in page and f"<h2>{heading}</h2>" in page
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    assert f'src="{uri}"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count('class="flagged"') == 1
    assert "<pre>dvc repro</pre>" in page


def test_cells_and_nested_summaries_read_well() -> None:
    assert html.format_cell(0.123456) == "0.123"
    assert html.format_cell(math.nan) == "–" and html.format_cell(None) == "–"
    assert html.format_cell(True) == "yes"
    flat = html.flatten({"checks": {"ids": {"passed": True}}, "columns": ["a", "b"], "rows": [{"n": 1}]})
    assert flat == {"checks.ids.passed": True, "columns": "a, b", "rows.0.n": 1}

"""`psyface explain` on the bad-input corpus: usable files explained, each bad one named, exit 2."""

from __future__ import annotations

import re

import pytest
from bad_inputs import IMAGE_CASES
from factories import draw_face

from tests.conftest import run_cli
from tests.test_explain_cli import (
    registry,  # noqa: F401  (the module fixture: a registered VGG11)
)

pytestmark = pytest.mark.slow  # trains a network, runs the CLI in subprocesses


def test_explain_maps_the_usable_files_and_names_each_bad_one(registry, tmp_path):  # noqa: F811
    root, uri = registry
    draw_face(48).save(tmp_path / "good.png")
    for case, (write, suffix, _) in IMAGE_CASES.items():
        write(tmp_path / f"{case}{suffix}")
    files = sorted(str(p) for p in tmp_path.iterdir())
    result = run_cli("explain", "--model", "models:/faces@champion", "--attribute", "happy", *files,
                     "--out", str(tmp_path / "maps"), cwd=root, env={"MLFLOW_TRACKING_URI": uri})
    bad = {case: reason for case, (_, _, reason) in IMAGE_CASES.items() if reason != "ok"}
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"psyface: error: {len(bad)} of {len(files)} image file(s) could not be used")
    for case, reason in bad.items():
        assert re.search(rf"\[{reason}\] \S*{case}\.", error), case
    explained = {p.name.split("_gradcam_")[0] for p in (tmp_path / "maps").iterdir()}
    assert explained == {"good"} | {case for case, (_, _, reason) in IMAGE_CASES.items() if reason == "ok"}
    assert len(list((tmp_path / "maps").iterdir())) == 2 * len(explained)  # a .npy and a .png each, no temp files

"""Shared fixtures: a tiny valid dataset in the canonical layout, inside a fresh working folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import psyface
from factories import make_dataset
from psyface.dataset.layout import DatasetSpec

SRC = str(Path(psyface.__file__).resolve().parents[1])


def subprocess_env() -> dict[str, str]:
    """Environment for `sys.executable -m psyface.cli ...` that imports this checkout's code."""
    return {**os.environ, "PYTHONPATH": SRC}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder as the current directory (stages use relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_dataset(workdir: Path) -> DatasetSpec:
    """data/ with 6 valid rows of 40 px faces; params.yaml with the validate defaults."""
    (workdir / "params.yaml").write_text("validate:\n  on_bad_rows: fail\n  min_image_side: 32\n")
    return make_dataset(workdir / "data", rows=6)

"""Shared fixtures: tiny synthetic datasets made by the real generator (no binary files in git)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# xdist workers share the machine's cores: each worker, and every stage it starts in a subprocess,
# gets its share of threads, so no OpenMP pool spins on a core another worker is computing on (on
# 2 cores, 2 workers x 2 threads ran the subprocess-training tests about 10 % slower). Set before
# torch is first imported, which reads it once; a value the caller set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

from factories import make_dataset  # noqa: E402

import psyface  # noqa: E402
from psyface.dataset.layout import DatasetSpec  # noqa: E402
from psyface.dataset.synth import SynthConfig, generate  # noqa: E402

SRC = Path(psyface.__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, the bundles that must stay on one worker (xdist groups) leading: xdist hands
    out work in collection order, so a long bundle collected last would run alone at the end while
    the other worker waits; started first, the short tests fill in around it. (Stable: a module's
    own order, e.g. the team server's kill test last, is kept.)"""
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.get_closest_marker("xdist_group") is not None else 1
    items.sort(key=rank)


def make_synthetic(root: Path, **overrides: object) -> Path:
    """Generate a small synthetic dataset into `root` (default: 24 identities x 2 images, 64 px)."""
    config = SynthConfig(**{"n_identities": 24, "images_per_identity": 2, "size": 64, **overrides})
    generate(root, config, progress=False)
    return root


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only small synthetic dataset shared by the whole session: do not modify it."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture(scope="session")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default dataset (1,500 faces, what `psyface synth` writes) for the tests that need
    the real thing: do not modify it. Its users share the xdist group `default_data`, so one worker
    generates it, once."""
    root = tmp_path_factory.mktemp("default") / "data"
    generate(root, SynthConfig(), progress=False)
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m psyface.cli ARGS` in a fresh process, as a user would from a shell."""
    environment = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "psyface.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def run_dvc(root: Path, *args: str, env: dict[str, str]) -> str:
    """`dvc ARGS` (the venv's) in `root`; it must succeed. -> its stdout."""
    result = subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder as the current directory (stages use relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_dataset(workdir: Path) -> DatasetSpec:
    """data/ with 6 valid rows of 40 px cartoon faces (tests/factories.py); validate defaults in params.yaml."""
    (workdir / "params.yaml").write_text("validate:\n  on_bad_rows: fail\n  min_image_side: 32\n")
    return make_dataset(workdir / "data", rows=6)

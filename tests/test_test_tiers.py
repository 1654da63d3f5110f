"""The test runner does what the suite's layout relies on: `--dist loadgroup` keeps an xdist group on
one worker (the team server, the pipeline and report projects and the default dataset are built once
per group, not once per worker). pytest 9.2 silently broke this with xdist 3.8 (pytest-xdist#1386):
the groups' tests were spread over both workers and every shared fixture was built twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

GROUPED = '''import pytest
pytestmark = pytest.mark.xdist_group("together")
'''


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    for module in ("a", "b"):
        body = "".join(f"def test_{module}{i}():\n    pass\n" for i in range(4))
        (tmp_path / f"test_{module}.py").write_text(GROUPED + body)
    (tmp_path / "test_loose.py").write_text("".join(f"def test_loose{i}():\n    pass\n" for i in range(4)))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    ran = re.findall(r"\[(gw\d)\] .*PASSED \S*::(test_\w+?)(@\w+)?\s", done.stdout)
    assert len(ran) == 12, done.stdout[-2000:]
    grouped = {(worker, group) for worker, name, group in ran if not name.startswith("test_loose")}
    assert grouped in ({("gw0", "@together")}, {("gw1", "@together")}), grouped


def test_install_refuses_a_full_disk_in_one_line_before_pip_runs(tmp_path: Path) -> None:
    """A CI run once died three minutes into pip with "No space left on device" and a
    half-written venv; `make install` checks the room first."""
    venv = tmp_path / "venv"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["make", "-s", "install", f"VENV={venv}", "INSTALL_FREE_GB=100000000"], cwd=root,
                          capture_output=True, text=True, timeout=60)  # also under `make test`: make[1]
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1 and "GB free" in lines[0] and "100000000 GB" in lines[0], done.stderr
    assert not venv.exists()

"""Atomic writes: a killed stage must never leave a half-written output that looks complete."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from psyface.errors import PsyfaceError, not_utf8


def make_folder(path: Path) -> Path:
    """`mkdir -p`, with one error line where part of the path is a file (a user's `--out` typo)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PsyfaceError(f"cannot make the folder {path}: part of that path is a file") from None
    return path


def output_file(path: Path) -> Path:
    """`path` checked as a file to write (not a folder), its folder made; commands call it before their
    work, so a wrong `--out` costs nothing."""
    if path.is_dir():
        raise PsyfaceError(f"{path} is a folder; name a file to write")
    make_folder(path.parent)
    return path


def output_folder(path: Path) -> Path:
    """`path` checked as a folder to write (not a file), its parent made."""
    if path.exists() and not path.is_dir():
        raise PsyfaceError(f"{path} is a file, not a folder; name a folder to write")
    make_folder(path.parent)
    return path


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary sibling of `path`, then rename it into place."""
    output_file(path)
    remove_dead_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def remove_dead_leftovers(path: Path) -> None:
    """Delete `.NAME.tmp-PID` siblings of `path` left by writers that were killed (their PID is gone)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rpartition("-")[2]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine. A killed process whose parent has not
    reaped it yet (a zombie: orphans wait for the container's init, seconds here) counts as gone:
    it still answers `kill(pid, 0)` but holds no port, lock or file."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def replace_dir_atomic(path: Path, fill: Callable[[Path], None]) -> Path:
    """Build a whole output folder under a temporary name, then swap it in."""
    output_folder(path)
    remove_dead_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_csv_checked(path: Path, **read_csv_options: Any) -> pd.DataFrame:
    """`pd.read_csv` whose every failure (missing, not UTF-8, empty, unparsable) names the file."""
    if not path.is_file():
        raise PsyfaceError(f"table {path} not found")
    try:
        return pd.read_csv(path, encoding="utf-8", **read_csv_options)
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from None
    except pd.errors.EmptyDataError:
        raise PsyfaceError(f"{path} is empty: expected a header line and one row per image") from None
    except pd.errors.ParserError as error:
        raise PsyfaceError(f"cannot parse {path}: {error}") from None


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def json_text(data: Any) -> str:
    """JSON that every reader (DVC, browsers) accepts: NaN and infinities become null, numpy scalars
    become numbers; the one place undefined scores turn into null."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(key): clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def write_json_atomic(data: Any, path: Path) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json_text(data), encoding="utf-8"))

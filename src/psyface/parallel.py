"""Independent jobs spread over this process's cores with the standard library's process pool."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (which containers and `taskset` narrow), not
    the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_map(function: Callable[..., Any], jobs: Sequence[tuple], workers: int, bar: dict[str, Any],
                chunksize: int = 1) -> list[Any]:
    """`[function(*job) for job in jobs]`, in order, on up to `workers` forked processes (in this
    process when one is enough), with a tqdm bar (`bar`: its keyword arguments) over the jobs.
    Forks, not fresh interpreters: a spawned worker would pay seconds of imports (torch) first."""
    workers = min(workers, len(jobs))
    columns = list(zip(*jobs, strict=True)) if jobs else []
    if workers <= 1:
        return list(tqdm(map(function, *columns), total=len(jobs), **bar))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(tqdm(pool.map(function, *columns, chunksize=chunksize), total=len(jobs), **bar))

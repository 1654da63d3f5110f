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
                chunksize: int = 1, spawn: bool = False) -> list[Any]:
    """`[function(*job) for job in jobs]`, in order, on up to `workers` processes (in this process
    when one is enough), with a tqdm bar (`bar`: its keyword arguments) over the jobs.

    `spawn`: fresh interpreters instead of forks, for callers that have started torch, whose
    OpenMP thread pool does not survive a fork."""
    workers = min(workers, len(jobs))
    columns = list(zip(*jobs, strict=True)) if jobs else []
    if workers <= 1:
        return list(tqdm(map(function, *columns), total=len(jobs), **bar))
    context = multiprocessing.get_context("spawn") if spawn else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(tqdm(pool.map(function, *columns, chunksize=chunksize), total=len(jobs), **bar))

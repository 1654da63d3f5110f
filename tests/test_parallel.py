from __future__ import annotations

import os

from psyface.parallel import process_map


def square_and_pid(value: int, offset: int) -> tuple[int, int]:
    return value * value + offset, os.getpid()


def test_process_map_keeps_job_order_and_runs_in_worker_processes_only_when_asked():
    jobs = [(value, 1) for value in range(7)]
    serial = process_map(square_and_pid, jobs, workers=1, bar={"disable": True})
    forked = process_map(square_and_pid, jobs, workers=2, bar={"disable": True})
    assert [result for result, _ in serial] == [result for result, _ in forked] == [v * v + 1 for v in range(7)]
    assert {pid for _, pid in serial} == {os.getpid()}
    assert os.getpid() not in {pid for _, pid in forked}


"""Data-parallel training with torchrun/DDP: who this process is, how a global batch is shared,
and how results come back together.

`python -m psyface.train` either runs as one worker of a torchrun job (the environment holds
`RANK`/`WORLD_SIZE`, e.g. under `torchrun --standalone --nproc-per-node 2 -m psyface.train`) or,
when `train.distributed.nproc_per_node > 1` and it is not a worker yet, launches the workers itself
through torchrun's own launcher (`launch`), with a free rendezvous port so two queued DVC
experiments on one machine never collide. `train.batch_size` stays the global batch: every rank
draws the same order and augmentation, trains on its contiguous `share` of each batch, and scales its
loss by its share (`loss_weight`) so DDP's gradient average equals the one-process mean.
Only rank 0 touches MLflow and the checkpoints (MLflow #11782: every rank would open its own run).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from psyface.config import PositiveInt
from psyface.errors import PsyfaceError

T = TypeVar("T")
WORKER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun for each worker


@dataclass
class DistributedParams:
    nproc_per_node: PositiveInt = 1  # > 1: psyface starts this many workers with torchrun (one node)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = True  # SyncBatchNorm across ranks; CUDA only (on CPU each rank normalises its share)


@dataclass(frozen=True)
class Context:
    """This process's place in the job; the default is the one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def tags(self) -> dict[str, str]:
        return {"distributed.world_size": str(self.world_size), "distributed.backend": self.backend}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_worker() -> bool:
    """Whether torchrun started this process (then it trains instead of launching)."""
    return all(name in os.environ for name in WORKER_VARIABLES)


@contextmanager
def session(params: DistributedParams) -> Iterator[Context]:
    """The process group of a torchrun worker (or the one-process context), torn down at the end."""
    if not is_worker() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Context(device=default_device())
        return
    rank, world, local = (int(os.environ[name]) for name in WORKER_VARIABLES)
    cuda = torch.cuda.is_available()
    backend = params.backend if params.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise PsyfaceError("train.distributed.backend nccl needs CUDA; use gloo (or auto) on CPUs")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    try:
        yield Context(rank, world, local, backend, device, sync_bn=params.sync_bn and cuda)
    finally:
        dist.destroy_process_group()


def share(n: int, context: Context) -> slice:
    """This rank's contiguous rows of `n` (sizes differ by at most one; rank order = row order)."""
    base, extra = divmod(n, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def loss_weight(rows: int, total: int, context: Context) -> float:
    """Factor on a rank's mean loss over its `rows` of a `total`-row batch: DDP averages gradients
    over ranks, so weighting by rows * world_size / total makes that average the gradient of the
    one-process mean over the whole batch, also when the last batch does not split evenly."""
    return rows * context.world_size / total


def wrap(net: torch.nn.Module, context: Context) -> torch.nn.Module:
    """`net` in DistributedDataParallel (batch norm synchronised where supported), or as it is."""
    if not context.enabled:
        return net
    if context.sync_bn:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # replaces the BN children in place
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def gather_rows(local: np.ndarray, context: Context) -> np.ndarray:
    """Every rank's rows concatenated in rank order, on every rank (empty shares contribute nothing)."""
    if not context.enabled:
        return local
    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, local)
    return np.concatenate([part for part in parts if len(part)])


def gather(value: T, context: Context) -> list[T]:
    """One picklable value from each rank, in rank order."""
    if not context.enabled:
        return [value]
    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, value)
    return parts


def sum_over_ranks(values: list[float], context: Context) -> list[float]:
    if not context.enabled or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device if context.backend == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: T, context: Context) -> T:
    """Rank 0's `value` on every rank (what rank 0 decided, e.g. to stop early or which run to resume)."""
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def launch(nproc_per_node: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as `nproc_per_node` torchrun workers on this node and wait.

    The same launcher as `torchrun --standalone` (c10d rendezvous on localhost, port 0: the OS
    picks a free port, so concurrent jobs never collide), called in-process so a failed worker
    ends in one line and its exit code instead of torchrun's error report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: loopback, whatever the hostname resolves to
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them N times
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
    except ChildFailedError as error:
        codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
        stopped = -int(signal.SIGTERM)  # a rank the launcher stopped because another one failed
        if set(codes.values()) - {stopped} <= {2, 130} and set(codes.values()) != {stopped}:
            return 2 if 2 in codes.values() else 130  # a user error or an interruption: the worker said why
        print(f"psyface: error: training worker(s) failed, rank: exit code {codes} (their output is above)",
              file=sys.stderr)
        return 1
    except SignalException as error:
        print(f"psyface: interrupted ({error.sigval.name}); the workers were stopped", file=sys.stderr)
        return 130
    return 0

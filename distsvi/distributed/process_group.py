"""The process group: one object per rank describing where it runs.

:func:`init` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), picks the backend (NCCL with one
GPU per local rank when CUDA is available, Gloo otherwise), sets the device and
returns a :class:`ProcessGroup`. Without that environment the world has size 1 and no
``torch.distributed`` group is started, so one script serves both a debugging run and
one rank of a job::

    group = distsvi.distributed.init()
    ...
    distsvi.distributed.shutdown()
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import platform
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class ProcessGroup:
    """Where this rank runs: its place in the job, its device and backend.

    :param int rank: global rank, ``0 <= rank < world_size``.
    :param int world_size: number of ranks in the job.
    :param int local_rank: rank on this node (the GPU index under NCCL).
    :param torch.device device: the device this rank computes on.
    :param backend: ``"nccl"``, ``"gloo"``, or ``None`` when no process group runs
        (world size 1).
    :param torch_group: the ``torch.distributed`` group collectives use; ``None`` means the
        default (world) group.
    :param float timeout_s: how long a rank waits for the others (the group's timeout).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    torch_group: dist.ProcessGroup | None = None
    timeout_s: float = DEFAULT_TIMEOUT.total_seconds()

    @property
    def is_main(self) -> bool:
        """``True`` on rank 0, the rank that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """``True`` when collectives are needed (world size above 1)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def default_backend() -> str:
    """NCCL when CUDA is available, Gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest glibc accepts on 64-bit machines


def tune_allocator(keep_bytes: int = 2**30) -> bool:
    """Keep freed CPU memory mapped between steps (glibc only; a no-op elsewhere).

    Every step allocates and frees the same activation-sized buffers. By default glibc
    serves buffers above a moving threshold with fresh ``mmap`` calls and gives freed
    memory at the top of its heap back to the OS, so a step can page-fault on all of its
    activations again: measured at 8192 datapoints of an MLP, 5000 page faults and 12% of
    the step's time, which also makes ranks of one job unequal and the fast ones wait.
    This serves buffers up to 32 MiB from the heap and keeps up to ``keep_bytes`` of freed
    heap mapped, at the price of the process's resident memory staying near its peak.
    It changes the whole process's allocator, so it is applied by :func:`init` on CPU and
    by ``distsvi train``, not by the engine.

    :param int keep_bytes: freed memory at the top of the heap that stays mapped.
    :returns: whether the settings were applied (``False`` where libc is not glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, keep_bytes)
    )


def pin_to_cores(local_rank: int, local_world_size: int) -> list[int]:
    """Give this process its own share of the cores it may run on: ``k`` consecutive cores,
    ``k`` = available cores // ranks on this node, and at most ``k`` torch threads.

    On CPU, ranks that share cores stall each other (a rank waiting in a collective is
    woken late when the other rank's compute holds its core): measured with 2 ranks on 2
    cores, pinning took a step of the scaling benchmark from 8.2 to 6.6 ms. Not the
    default, because two jobs pinned on one machine would share the same cores.

    :param int local_rank: this rank's place on the node.
    :param int local_world_size: the ranks on the node (``LOCAL_WORLD_SIZE``).
    :returns: the cores this process now runs on.
    :raises ValueError: if there are fewer cores than ranks on the node.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pinning ranks to cores needs Linux (os.sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // local_world_size
    if per_rank == 0:
        raise ValueError(
            f"cannot pin {local_world_size} ranks to {len(cores)} cores: run at most "
            f"{len(cores)} ranks on this node, or do not pin (dist.pin_cpus=false)"
        )
    mine = cores[local_rank * per_rank : (local_rank + 1) * per_rank]
    os.sched_setaffinity(0, mine)
    if torch.get_num_threads() > per_rank:
        torch.set_num_threads(per_rank)
    return mine


def init(
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    device: str | torch.device | None = None,
    tune_cpu_allocator: bool = True,
    pin_cpus: bool = False,
) -> ProcessGroup:
    """Join the job described by the ``torchrun`` environment.

    With ``WORLD_SIZE`` unset or 1 no process group is started. If a default process
    group already exists (created by the caller), it is reused and left to the caller
    to destroy.

    :param backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available,
        Gloo otherwise.
    :param timeout: how long a collective may wait for the other ranks before it
        fails instead of hanging.
    :param device: the device to compute on; default ``cuda:LOCAL_RANK`` under NCCL
        (made the current CUDA device), else ``cpu``.
    :param bool tune_cpu_allocator: on CPU, call :func:`tune_allocator` so that steps stop
        page-faulting on their activations.
    :param bool pin_cpus: on CPU, give each rank of this node cores of its own
        (:func:`pin_to_cores`, with ``LOCAL_WORLD_SIZE`` ranks on the node).
    :returns: this rank's :class:`ProcessGroup`.

    Example::

        # torchrun --standalone --nproc-per-node=2 train.py
        group = init()
        print(group.rank, group.world_size, group.device, group.backend)
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"RANK={rank} and WORLD_SIZE={world_size} do not describe a job; "
            "launch with torchrun, which sets both"
        )
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available; use 'gloo'")
    if device is None:
        device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        if tune_cpu_allocator:
            tune_allocator()
        if pin_cpus:
            cores = pin_to_cores(local_rank, _env_int("LOCAL_WORLD_SIZE", world_size))
            logger.info("rank %d pinned to cores %s", rank, cores)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun, "
                    "or set MASTER_ADDR and MASTER_PORT"
                )
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs
        )
        logger.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    backend = backend if world_size > 1 else None
    return ProcessGroup(
        rank, world_size, local_rank, device, backend, timeout_s=timeout.total_seconds()
    )


def current() -> ProcessGroup:
    """Describe the running default process group without starting one.

    :returns: a :class:`ProcessGroup` of world size 1 on CPU when no group runs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessGroup()
    backend = dist.get_backend()
    rank = dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    device = torch.device(f"cuda:{local_rank}" if backend == "nccl" else "cpu")
    return ProcessGroup(rank, dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    """Leave the job: wait for the other ranks, then destroy the process group.

    Does nothing when no process group runs.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""Gradient averaging through shared memory, for CPU ranks that share one machine.

Gloo moves CPU tensors over TCP even between processes of one host: every byte of a
bucket is copied into the kernel and out again on each side, twice (the ring's
reduce-scatter and its all-gather), on the cores that also run backward. Ranks of one
host can instead read each other's gradients where they lie. Each rank owns a segment of
``/dev/shm`` that every rank maps; a step then costs three passes over memory and two
small Gloo all-reduces, which also serve as the barriers:

1. each rank copies its gradients into its segment's input half;
2. all-reduce of the trailer (the loss and the layout flag): every input is written;
3. rank ``r`` sums slice ``r`` of every rank's input, in rank order, into its segment's
   result half, divides by the world size and flags non-finite values in the same pass;
4. all-reduce of the flags: every slice is summed;
5. each rank copies the other ranks' slices of the result into its own result half,
   whose views become the gradients.

Each slice is summed by one rank only, so every rank ends with the same bits. No rank
writes what another may still read: a rank's input is rewritten only after the next
step's barrier 2, which every rank reaches after its reads of step 3, and a slice of its
result only after that same barrier, after every rank's copies of step 5.

On a 2-core machine, one thread per rank, 105 MB of float32 gradients: 39 ms per step
(copy-in and non-finite check included), against 116 ms for Gloo's all-reduce of the
same buckets and the check (``benchmarks/scaling.py``'s wide case times the whole step).

The segments are made at the first step and whenever the set of params changes, by a
collective (:func:`shared_memory_reducer`): each rank creates and sizes its file, every
rank maps every file, and each removes its own file once all have mapped it, so nothing
is left in ``/dev/shm`` when the job ends, however it ends. If any rank cannot create or
map a segment (ranks on different machines, no ``/dev/shm``, too little space in it),
every rank falls back to Gloo's bucketed all-reduce; the decision is one all-reduce, so
the ranks never part ways.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import ProcessGroup
from . import reduce
from .reduce import all_ranks, average_and_check_, wait_all

logger = logging.getLogger(__name__)

# Where segments live; a ``tmpfs`` on Linux. Ranks that cannot see each other's files
# here are on different machines (or in different containers) and use Gloo.
SHM_DIR = "/dev/shm"


class SharedMemoryReducer:
    """The averaging of a fixed list of same-dtype CPU gradients over the ranks of one
    host, through segments every rank has mapped. Same interface as
    :class:`~distsvi.distributed.reduce.BucketReducer`; it starts nothing during
    backward (the copies are memory traffic on the rank's own cores either way).

    Build it with :func:`shared_memory_reducer`, which makes the segments.
    """

    started_in_backward = 0

    def __init__(
        self,
        tensors: Sequence[Tensor],
        group: ProcessGroup,
        segments: list[Tensor],
        busy_wait_s: float = 0.0,
    ) -> None:
        self.tensors = list(tensors)
        self.group = group
        self.busy_wait_s = busy_wait_s
        self.numel = sum(t.numel() for t in self.tensors)
        m, world = self.numel, group.world_size
        self.inputs = [s[:m] for s in segments]
        self.results = [s[m : 2 * m] for s in segments]
        self.bounds = [m * i // world for i in range(world + 1)]

    def arm(self) -> None:
        pass

    def disarm(self) -> None:
        pass

    def close(self) -> None:
        """Drop the mappings (the memory goes once no rank maps it)."""
        self.inputs, self.results = [], []

    def _barrier_sum(self, t: Tensor) -> Tensor:
        work = dist.all_reduce(t, group=self.group.torch_group, async_op=True)
        wait_all([work], self.busy_wait_s)
        return t

    def reduce(self, grads: Sequence[Tensor], trailer: Tensor) -> tuple[list[Tensor], Tensor]:
        """Average ``grads`` and ``trailer`` over ranks; see
        :meth:`~distsvi.distributed.reduce.BucketReducer.reduce` for what is returned."""
        rank, world = self.group.rank, self.group.world_size
        mine = self.inputs[rank]
        torch.cat([g.reshape(-1) for g in grads], out=mine)
        total = self._barrier_sum(trailer.detach().to(torch.float64))
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        out = self.results[rank][lo:hi]
        torch.add(self.inputs[0][lo:hi], self.inputs[1][lo:hi], out=out)
        for other in self.inputs[2:]:
            out.add_(other[lo:hi])
        found = self._barrier_sum(average_and_check_([out], world).to(torch.float64))
        result = self.results[rank]
        for r in range(world):
            if r != rank:
                a, b = self.bounds[r], self.bounds[r + 1]
                result[a:b].copy_(self.results[r][a:b])
        averaged, offset = [], 0
        for t in self.tensors:
            n = t.numel()
            averaged.append(result[offset : offset + n].view_as(t))
            offset += n
        flag = (found > 0).to(total.dtype)
        return averaged, torch.cat((total / world, flag)).to(trailer.dtype)


def _eligible(tensors: Sequence[Tensor], group: ProcessGroup, mode: bool | None) -> bool:
    if mode is False or not group.is_distributed or group.backend != "gloo" or not tensors:
        return False
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return False
    # Gradients small enough for Gloo to gather in one bucket (a few kilobytes) take one
    # collective that way against two barriers here. Above that, shared memory is faster:
    # 240 KB at 2 ranks, 10.4-11.6 ms steps against 10.6-12.0 ms with Gloo's all-reduce
    # (the amortized model of benchmarks/scaling.py, interleaved); 256 bytes, 3.6 ms
    # against 3.2 ms gathered (the latency case).
    nbytes = sum(t.numel() for t in tensors) * dtype.itemsize
    return mode is True or nbytes * group.world_size > reduce.GATHER_MAX_BYTES


def _path(tag: str, rank: int) -> str:
    return os.path.join(SHM_DIR, f"distsvi-{tag}-{rank}")


def _create(path: str, nbytes: int) -> str | None:
    """Create and size this rank's segment file; the reason on failure."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        return f"cannot create {path}: {e.strerror}"
    try:
        # Reserve the pages now: a tmpfs that runs out later raises SIGBUS on a write.
        os.posix_fallocate(fd, 0, nbytes)
    except (OSError, AttributeError) as e:
        os.unlink(path)
        return f"cannot reserve {nbytes} bytes in {SHM_DIR}: {getattr(e, 'strerror', e)}"
    finally:
        os.close(fd)
    return None


def _map(path: str, numel: int, dtype: torch.dtype, into: list[Tensor]) -> str | None:
    """Map another rank's segment (appended to ``into``); the reason on failure."""
    # from_file(shared=True) would create a missing file: a rank on another machine would
    # then map a fresh segment of its own and average with nobody. Check it exists first.
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return f"cannot see {path}: {e.strerror}"
    if size != numel * dtype.itemsize:
        return f"{path} has {size} bytes, not {numel * dtype.itemsize}"
    try:
        into.append(torch.from_file(path, shared=True, size=numel, dtype=dtype))
    except (OSError, RuntimeError) as e:
        return f"cannot map {path}: {e}"
    return None


def shared_memory_reducer(
    tensors: Sequence[Tensor],
    group: ProcessGroup,
    busy_wait_s: float = 0.0,
    mode: bool | None = None,
) -> SharedMemoryReducer | None:
    """A :class:`SharedMemoryReducer` for ``tensors``, or ``None`` where Gloo's buckets
    must do (the same answer on every rank).

    Collective: every rank calls it at the same point with the same (agreed) tensors.

    :param tensors: the gradients' tensors, in the order all ranks agreed on.
    :param group: the process group.
    :param float busy_wait_s: poll the barriers this long before blocking.
    :param mode: ``None`` (auto): CPU ranks, one float dtype, and more gradient bytes
        than Gloo gathers in one bucket (world size times the bytes above
        :data:`~distsvi.distributed.reduce.GATHER_MAX_BYTES`); ``True``: whatever the
        size; ``False``: never.
    """
    if not _eligible(tensors, group, mode):
        return None
    rank, world = group.rank, group.world_size
    dtype = tensors[0].dtype
    numel = sum(t.numel() for t in tensors)
    # A name no other job or layout uses: random bits from rank 0.
    word = torch.tensor([int.from_bytes(secrets.token_bytes(7), "little") if rank == 0 else 0])
    src = 0 if group.torch_group is None else dist.get_global_rank(group.torch_group, 0)
    dist.broadcast(word, src, group=group.torch_group)
    tag = f"{int(word):014x}"
    own = _path(tag, rank)
    why = _create(own, 2 * numel * dtype.itemsize)
    created = why is None
    segments: list[Tensor] = []
    try:
        if all_ranks(why is None, group):
            for r in range(world):
                why = _map(_path(tag, r), 2 * numel, dtype, segments)
                if why is not None:
                    break
            mapped = all_ranks(why is None, group)
        else:
            mapped = False
    finally:
        if created:  # every rank has mapped it, or none will use it
            os.unlink(own)
    if not mapped:
        log = logger.warning if mode is True else logger.info
        log(
            "gradients are averaged with Gloo's all-reduce, not through shared memory: %s",
            why or "another rank could not create or map its segment (ranks on several machines?)",
        )
        return None
    return SharedMemoryReducer(tensors, group, segments, busy_wait_s)

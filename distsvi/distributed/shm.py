"""Gradient averaging through shared memory, for CPU ranks that share one machine.

Gloo moves CPU tensors over TCP even between processes of one host: every byte of a
bucket is copied into the kernel and out again on each side, twice (the ring's
reduce-scatter and its all-gather), on the cores that also run backward, and every
collective waits for Gloo's threads and the peer's to wake (0.6-2 ms for a few hundred
bytes on a 2-core virtual machine). Ranks of one host can instead read each other's
gradients where they lie. Each rank owns a segment of ``/dev/shm`` that every rank maps;
a step then costs three passes over memory and two barriers:

1. each rank copies its gradients into its segment's input half;
2. barrier 1, which also sums the trailer (the loss and the layout flag): every input is
   written;
3. rank ``r`` sums slice ``r`` of every rank's input, in rank order, into its segment's
   result half, divides by the world size and flags non-finite values in the same pass;
4. barrier 2, which also sums the flags: every slice is summed;
5. each rank copies the other ranks' slices of the result into its own result half,
   whose views become the gradients.

Each slice is summed by one rank only, so every rank ends with the same bits. No rank
writes what another may still read: a rank's input is rewritten only after the next
step's barrier 1, which every rank reaches after its reads of step 3, and a slice of its
result only after that same barrier, after every rank's copies of step 5.

A barrier is a counter in each segment's control page: a rank writes its few numbers
beside its counter, advances the counter, and polls the others' counters until all have
advanced (yielding its core for ``busy_wait_s``, then sleeping between polls), then sums
the numbers in rank order. That takes microseconds when the ranks arrive together, and
relies on stores becoming visible to other cores in program order, which x86 guarantees;
on other machines the barriers are small Gloo all-reduces instead. A rank waiting on a
peer whose process has exited raises at once; one waiting longer than the group's
timeout raises, naming the ranks it waited for.

Measured on a 2-core machine, one thread per rank: 105 MB of float32 gradients, 39 ms per
step (copy-in and non-finite check included) against 116 ms for Gloo's all-reduce of the
same buckets and the check; ``benchmarks/scaling.py`` times whole steps.

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
import mmap
import os
import platform
import secrets
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import reduce
from .process_group import ProcessGroup
from .reduce import all_ranks, average_and_check_, wait_all

logger = logging.getLogger(__name__)

# Where segments live; a ``tmpfs`` on Linux. Ranks that cannot see each other's files
# here are on different machines (or in different containers) and use Gloo.
SHM_DIR = "/dev/shm"

# Counter barriers need a store to become visible to other cores no earlier than the
# stores before it (x86's total store order); elsewhere the barriers go through Gloo.
SPIN_BARRIERS = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

# A segment's control page: int64 words 0 (the barrier counter) and 1 (the owner's pid),
# then two areas of float64 numbers summed by the two barriers of a step.
CONTROL_BYTES = 4096
AREA_SIZE = 16
_AREAS = slice(8, 8 + 2 * AREA_SIZE)  # in float64 words


class PeerExited(RuntimeError):
    """A rank's process exited while this rank waited for it (its own error is the cause)."""


class SharedMemoryReducer:
    """The averaging of a fixed list of same-dtype CPU gradients over the ranks of one
    host, through segments every rank has mapped. Same interface as
    :class:`~distsvi.distributed.reduce.BucketReducer`; it starts nothing during
    backward (the copies are memory traffic on the rank's own cores either way).

    Build it with :func:`shared_memory_reducer`, which makes the segments. ``spin``:
    counter barriers (else Gloo all-reduces); ``check_pids``: whether a waiting rank can
    see a peer's process exit.
    """

    started_in_backward = 0

    def __init__(
        self,
        tensors: Sequence[Tensor],
        group: ProcessGroup,
        maps: list[mmap.mmap],
        busy_wait_s: float,
        spin: bool,
        check_pids: bool,
    ) -> None:
        self.tensors = list(tensors)
        self.group = group
        self.busy_wait_s = busy_wait_s
        self.spin, self.check_pids = spin, check_pids
        self.numel = m = sum(t.numel() for t in self.tensors)
        dtype, world = self.tensors[0].dtype, group.world_size
        self._maps = maps
        data = [torch.frombuffer(mm, dtype=dtype, offset=CONTROL_BYTES, count=2 * m) for mm in maps]
        self.inputs = [d[:m] for d in data]
        self.results = [d[m:] for d in data]
        control = [
            torch.frombuffer(mm, dtype=torch.float64, count=CONTROL_BYTES // 8) for mm in maps
        ]
        self.areas = [c[_AREAS].view(2, AREA_SIZE) for c in control]
        self.words = [memoryview(mm)[:16].cast("q") for mm in maps]
        self.bounds = [m * i // world for i in range(world + 1)]
        self.count = 0  # barriers passed

    def arm(self) -> None:
        pass

    def disarm(self) -> None:
        pass

    def close(self) -> None:
        """Drop the mappings (the memory goes once no rank maps it)."""
        self.inputs = self.results = self.areas = self.words = []
        self._maps = []

    def _sum(self, values: Tensor, area: int) -> Tensor:
        """``values`` (a few float64 numbers) summed over ranks in rank order; returns once
        every rank has given its own: a barrier."""
        if not self.spin:
            work = dist.all_reduce(values, group=self.group.torch_group, async_op=True)
            wait_all([work], self.busy_wait_s)
            return values
        n = values.numel()
        self.areas[self.group.rank][area, :n].copy_(values)
        self.count += 1
        self.words[self.group.rank][0] = self.count  # publishes the numbers above
        self._wait(self.count)
        total = self.areas[0][area, :n].clone()
        for other in self.areas[1:]:
            total += other[area, :n]
        return total

    def _wait(self, count: int) -> None:
        words, world = self.words, self.group.world_size
        start = time.perf_counter()
        spin_until, deadline = start + self.busy_wait_s, start + self.group.timeout_s
        nap, next_check = 1e-5, start + 0.5
        while True:
            late = [r for r in range(world) if words[r][0] < count]
            if not late:
                return
            now = time.perf_counter()
            if now < spin_until:
                os.sched_yield()
                continue
            time.sleep(nap)
            nap = min(2 * nap, 1e-3)
            if now >= next_check:
                next_check = now + 0.5
                self._check(late, now >= deadline)

    def _check(self, late: list[int], timed_out: bool) -> None:
        for r in late:
            pid = self.words[r][1]
            if self.check_pids and not _alive(pid):
                raise PeerExited(
                    f"rank {r} (pid {pid}) exited while rank {self.group.rank} waited for it "
                    "to average gradients; see that rank's error"
                )
        if timed_out:
            raise RuntimeError(
                f"rank {self.group.rank} waited {self.group.timeout_s:.0f} s for ranks {late} "
                "to average gradients (the process group's timeout, dist.timeout_s); they "
                "are stuck or far slower than this rank"
            )

    def reduce(self, grads: Sequence[Tensor], trailer: Tensor) -> tuple[list[Tensor], Tensor]:
        """Average ``grads`` and ``trailer`` over ranks; see
        :meth:`~distsvi.distributed.reduce.BucketReducer.reduce` for what is returned."""
        rank, world = self.group.rank, self.group.world_size
        torch.cat([g.reshape(-1) for g in grads], out=self.inputs[rank])
        total = self._sum(trailer.detach().to(torch.float64), 0)
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        out = self.results[rank][lo:hi]
        torch.add(self.inputs[0][lo:hi], self.inputs[1][lo:hi], out=out)
        for other in self.inputs[2:]:
            out.add_(other[lo:hi])
        found = self._sum(average_and_check_([out], world).to(torch.float64), 1)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def _eligible(
    tensors: Sequence[Tensor], group: ProcessGroup, mode: bool | None, trailer_numel: int
) -> bool:
    if mode is False or not group.is_distributed or group.backend != "gloo" or not tensors:
        return False
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or trailer_numel > AREA_SIZE:
        return False
    if any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return False
    if mode is True or SPIN_BARRIERS:
        return True
    # Gloo barriers: gradients small enough for Gloo to gather in one bucket take one
    # collective that way against two barriers here. Above that, shared memory is
    # faster: 240 KB at 2 ranks, 10.4-11.6 ms steps against 10.6-12.0 ms with Gloo's
    # all-reduce (the amortized model of benchmarks/scaling.py, interleaved); 256 bytes,
    # 3.6 ms against 3.2 ms gathered (the latency case).
    nbytes = sum(t.numel() for t in tensors) * dtype.itemsize
    return nbytes * group.world_size > reduce.GATHER_MAX_BYTES


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


def _map(path: str, nbytes: int, into: list[mmap.mmap]) -> str | None:
    """Map a rank's segment (appended to ``into``); the reason on failure."""
    try:
        fd = os.open(path, os.O_RDWR)  # never creates: a missing file is another machine's
    except OSError as e:
        return f"cannot see {path}: {e.strerror}"
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            return f"{path} has {size} bytes, not {nbytes}"
        into.append(mmap.mmap(fd, nbytes))
    except (OSError, ValueError) as e:
        return f"cannot map {path}: {e}"
    finally:
        os.close(fd)
    return None


def shared_memory_reducer(
    tensors: Sequence[Tensor],
    group: ProcessGroup,
    busy_wait_s: float = 0.0,
    mode: bool | None = None,
    trailer_numel: int = 2,
) -> SharedMemoryReducer | None:
    """A :class:`SharedMemoryReducer` for ``tensors``, or ``None`` where Gloo's buckets
    must do (the same answer on every rank).

    Collective: every rank calls it at the same point with the same (agreed) tensors.

    :param tensors: the gradients' tensors, in the order all ranks agreed on.
    :param group: the process group.
    :param float busy_wait_s: poll the barriers this long before sleeping between polls.
    :param mode: ``None`` (auto): CPU ranks and one float dtype (with Gloo barriers, off
        x86, also more gradient bytes than Gloo gathers in one bucket: world size times
        the bytes above :data:`~distsvi.distributed.reduce.GATHER_MAX_BYTES`); ``True``:
        whatever the size; ``False``: never.
    :param int trailer_numel: how many numbers ride with the gradients.
    """
    if not _eligible(tensors, group, mode, trailer_numel):
        return None
    rank, world = group.rank, group.world_size
    dtype = tensors[0].dtype
    nbytes = CONTROL_BYTES + 2 * sum(t.numel() for t in tensors) * dtype.itemsize
    # A name no other job or layout uses: random bits from rank 0.
    word = torch.tensor([int.from_bytes(secrets.token_bytes(7), "little") if rank == 0 else 0])
    src = 0 if group.torch_group is None else dist.get_global_rank(group.torch_group, 0)
    dist.broadcast(word, src, group=group.torch_group)
    tag = f"{int(word):014x}"
    own = _path(tag, rank)
    why = _create(own, nbytes)
    created = why is None
    maps: list[mmap.mmap] = []
    try:
        if all_ranks(why is None, group):
            for r in range(world):
                why = _map(_path(tag, r), nbytes, maps)
                if why is not None:
                    break
            else:
                memoryview(maps[rank])[:16].cast("q")[1] = os.getpid()
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
    # Whether a peer's exit can be seen from here (not across pid namespaces).
    pids = [memoryview(mm)[:16].cast("q")[1] for mm in maps]
    check_pids = all_ranks(all(_alive(p) for p in pids), group)
    return SharedMemoryReducer(tensors, group, maps, busy_wait_s, SPIN_BARRIERS, check_pids)

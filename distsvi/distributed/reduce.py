"""Collectives: bucketed gradient all-reduce, parameter broadcast, agreed decisions.

Everything here is called by every rank of a :class:`~distsvi.distributed.ProcessGroup`
in the same order (a collective that only some ranks reach hangs). Gradients travel in
contiguous buckets of about ``bucket_cap_mb``, one asynchronous collective per bucket
(DESIGN.md invariant 6); decisions that change control flow are all-reduced before any
rank acts on them (invariant 4). CPU ranks that share a machine average through shared
memory instead (:mod:`distsvi.distributed.shm`), with these functions' barriers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .process_group import ProcessGroup


def bucket_indices(tensors: Sequence[Tensor], cap_bytes: int) -> list[list[int]]:
    """Split ``tensors`` into buckets for flattening.

    A bucket holds consecutive tensors of one dtype and device and at most ``cap_bytes``
    bytes; a tensor larger than the cap gets a bucket of its own.

    :param tensors: the tensors, in a fixed order agreed by all ranks.
    :param int cap_bytes: the largest size of a bucket, in bytes.
    :returns: for each bucket, the positions of its tensors in ``tensors``.
    """
    buckets: list[list[int]] = []
    key, size = None, 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if buckets and (t.dtype, t.device) == key and size + nbytes <= cap_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            key, size = (t.dtype, t.device), nbytes
    return buckets


def _trailer_bucket(tensors: Sequence[Tensor], buckets: list[list[int]], trailer: Tensor) -> int:
    """The last bucket that can carry ``trailer`` without losing precision, or -1."""
    for b in range(len(buckets) - 1, -1, -1):
        t = tensors[buckets[b][0]]
        if t.device == trailer.device and t.dtype in (torch.float32, torch.float64):
            return b
    return -1


def wait_all(works: Sequence[dist.Work], busy_wait_s: float = 0.0) -> None:
    """Wait for ``works``, polling for up to ``busy_wait_s`` seconds before blocking.

    A rank that blocks in ``wait()`` lets its core go idle, and on a virtual machine an idle
    core is handed back to the host: waking it when the other rank's data arrives took
    2-5 ms in about half the steps measured, against 0.5 ms for the all-reduce itself.
    Polling (yielding the core to any other runnable thread between polls) keeps it awake.
    After ``busy_wait_s`` it blocks, so a slow or failed rank costs no more CPU than that
    and errors and timeouts surface from ``wait()`` as usual.

    :param works: the handles of asynchronous collectives.
    :param float busy_wait_s: how long to poll first (0: block at once).
    """
    if busy_wait_s > 0:
        deadline = time.perf_counter() + busy_wait_s
        pending = [w for w in works if not w.is_completed()]
        while pending and time.perf_counter() < deadline:
            os.sched_yield()
            pending = [w for w in pending if not w.is_completed()]
    for work in works:
        work.wait()


# Up to this many bytes gathered (the bucket times the world size), Gloo's ring all-reduce
# is latency-bound: it takes 2(W-1) rounds of messages where an all-gather takes W-1, and
# a few kilobytes cost no more to send whole than in pieces. Such a bucket is gathered and
# summed locally instead, which halves the rounds at two ranks (measured on 2 cores: a 1 KB
# all-reduce 0.6-1.7 ms, the all-gather 0.4-0.6 ms). NCCL's small all-reduce is fast.
GATHER_MAX_BYTES = 256 * 1024


def _all_gather(out: Tensor, flat: Tensor, group, async_op: bool):
    # torch 2.13 renamed all_gather_into_tensor (which now warns); older torch lacks the new name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, flat, group=group, async_op=async_op)


def _gathers(group: ProcessGroup, flat: Tensor) -> bool:
    return (
        group.backend == "gloo"
        and flat.numel() * flat.element_size() * group.world_size <= GATHER_MAX_BYTES
    )


class BucketReducer:
    """The averaging all-reduce of a fixed list of gradients, one collective per bucket.

    With ``overlap``, a bucket's all-reduce starts during backward, as soon as autograd
    has produced every gradient in it (a post-accumulate-grad hook on each tensor), the way
    ``DistributedDataParallel`` overlaps communication with the rest of backward. Buckets
    start strictly in index order, so every rank issues the same collectives in the same
    order whatever the timing; a bucket whose gradients are not all produced (a param a
    step did not touch) starts in :meth:`reduce`, with zeros where a gradient is missing.
    The bucket that carries the trailer (the loss, known only after backward) always
    starts in :meth:`reduce`. Hooks act only between :meth:`arm` and :meth:`reduce`, so a
    backward outside a data-parallel step (a user's own) issues nothing.

    :param tensors: the gradients' tensors (leaf params), in an order agreed by all ranks.
    :param buckets: their split, from :func:`bucket_indices`.
    :param group: the process group.
    :param float busy_wait_s: poll for completion this long before blocking (see
        :func:`wait_all`).
    :param bool overlap: start buckets during backward (needs one backward per step).
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        buckets: list[list[int]],
        group: ProcessGroup,
        busy_wait_s: float = 0.0,
        overlap: bool = False,
    ) -> None:
        self.tensors, self.buckets, self.group = list(tensors), buckets, group
        self.busy_wait_s = busy_wait_s
        float_like = torch.empty(0, device=group.device)
        self.carrier = _trailer_bucket(self.tensors, buckets, float_like)
        # Buckets below this one may start during backward.
        self.early = self.carrier if self.carrier >= 0 else len(buckets)
        self.armed = False
        self.started_in_backward = 0
        self._gathered: list[Tensor] = []
        self._handles = []
        if overlap and self.early > 0:
            bucket_of = {i: b for b, idx in enumerate(buckets) for i in idx}
            for i, t in enumerate(self.tensors):
                if bucket_of[i] < self.early and t.requires_grad:
                    hook = self._hook(bucket_of[i])
                    self._handles.append(t.register_post_accumulate_grad_hook(hook))
        self._reset()

    def _reset(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.started = 0  # buckets 0 .. started-1 are in flight
        self.flats: list[Tensor] = []
        self.works: list[dist.Work] = []

    def arm(self) -> None:
        """A step begins: let the hooks start buckets during its backward."""
        self._reset()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def close(self) -> None:
        """Remove the hooks (the layout changed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, b: int):
        def on_grad(_: Tensor) -> None:
            if not self.armed:
                return
            if b < self.started:
                raise RuntimeError(
                    "a gradient was accumulated again after its bucket's all-reduce began: "
                    "the step ran backward more than once; pass DataParallelSVI("
                    "overlap_backward=False) for a loss that does"
                )
            self.ready[b] += 1
            while self.started < self.early and self.ready[self.started] == len(
                self.buckets[self.started]
            ):
                idx = self.buckets[self.started]
                self._start([self.tensors[i].grad for i in idx])

        return on_grad

    def _start(self, parts: list[Tensor]) -> None:
        parts = [t.reshape(-1) for t in parts]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        world, pg = self.group.world_size, self.group.torch_group
        if _gathers(self.group, flat):
            rows = flat.new_empty(world * flat.numel())
            self.works.append(_all_gather(rows, flat, group=pg, async_op=True))
            self.flats.append(rows.view(world, -1))
        else:
            self.works.append(dist.all_reduce(flat, group=pg, async_op=True))
            self.flats.append(flat)
        self.started += 1

    def reduce(self, grads: Sequence[Tensor], trailer: Tensor) -> tuple[list[Tensor], Tensor]:
        """Average ``grads`` (one per tensor, zeros for a missing one) and ``trailer`` over
        ranks: start the buckets not yet in flight, wait for all, divide by the world size.

        :returns: ``(averaged, trailer)``: views of the averaged values in the order of the
            tensors, and the averaged trailer followed by one more number, 1 if some
            averaged value is NaN or infinite and 0 otherwise. A non-finite value on any
            rank makes its sum over ranks non-finite, so whether to skip a step is decided
            the same on every rank without a further collective.
        """
        self.armed = False
        self.started_in_backward = self.started  # for tests and benchmarks
        for b in range(self.started, len(self.buckets)):
            parts = [grads[i] for i in self.buckets[b]]
            if b == self.carrier:
                parts.append(trailer.to(parts[0].dtype))
            self._start(parts)
        if self.carrier < 0:
            self._start([trailer.clone()])
        wait_all(self.works, self.busy_wait_s)
        tensors = self.tensors
        # gathered rows: every rank sums the same rows in the same order
        flats = [f.sum(0) if f.dim() == 2 else f for f in self.flats]
        nonfinite = average_and_check_(flats, self.group.world_size)
        averaged: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for b, idx in enumerate(self.buckets):
            flat = flats[b]
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                averaged[i] = flat[offset : offset + n].view_as(tensors[i])
                offset += n
        trailer_out = flats[self.carrier][-trailer.numel() :].to(trailer.dtype)
        # Gloo's thread may still hold a gathered buffer just after the wait. Kept until the
        # next step, the buffer's last reference is never Gloo's: a tensor that Python has
        # seen, freed last by Gloo's thread, needs the GIL, and a process destroying its
        # group holds the GIL while it joins that thread (a hang at exit, seen in torch 2.13).
        self._gathered = [f for f in self.flats if f.dim() == 2]
        self._reset()
        return averaged, torch.cat((trailer_out, nonfinite.to(trailer.device, trailer.dtype)))


def average_and_check_(flats: list[Tensor], world_size: int) -> Tensor:
    """Divide every tensor of ``flats`` by ``world_size`` in place, and say whether any
    value is non-finite, in one pass over the memory where torch can.

    :returns: a 1-element float tensor: 1 if some value of ``flats`` is NaN or infinite,
        0 otherwise.
    """
    found = torch.zeros(1, device=flats[0].device)
    # 1/W is exact in float32 for a power of two, so the product is the quotient exactly;
    # other world sizes divide after the check.
    exact = world_size & (world_size - 1) == 0
    inv = torch.full((1,), 1.0 / world_size if exact else 1.0, device=found.device)
    try:
        # AMP's unscale kernel: multiply and flag non-finite values in the same pass.
        torch._amp_foreach_non_finite_check_and_unscale_(flats, found, inv)
    except (AttributeError, NotImplementedError, RuntimeError):  # an older torch or device
        torch._foreach_mul_(flats, inv.item())
        total = torch.stack([f.sum() for f in flats]).sum()
        found = (~torch.isfinite(total)).to(found.dtype).reshape(1)
    if not exact:
        torch._foreach_div_(flats, float(world_size))
    return found


def all_reduce_mean(
    tensors: Sequence[Tensor],
    buckets: list[list[int]],
    trailer: Tensor,
    group: ProcessGroup,
    busy_wait_s: float = 0.0,
) -> tuple[list[Tensor], Tensor]:
    """Average ``tensors`` and ``trailer`` over ranks, one collective per bucket.

    Each bucket is flattened and its all-reduce issued asynchronously before the next is
    flattened; then all are awaited and divided by the world size (Gloo has no average).
    ``trailer`` (a few scalars, such as the loss) rides in the last float bucket, so it
    costs no collective of its own unless no bucket can carry it. See
    :meth:`BucketReducer.reduce` for what is returned.
    """
    return BucketReducer(tensors, buckets, group, busy_wait_s).reduce(tensors, trailer)


def broadcast_(
    tensors: Sequence[Tensor], group: ProcessGroup, cap_bytes: int, src: int = 0
) -> None:
    """Overwrite ``tensors`` in place on every rank with rank ``src``'s values.

    :param tensors: identical in shape and order on all ranks.
    :param group: the process group.
    :param int cap_bytes: the bucket size, in bytes.
    :param int src: the rank (within ``group``) whose values win.
    """
    src = src if group.torch_group is None else dist.get_global_rank(group.torch_group, src)
    with torch.no_grad():
        jobs = []
        for idx in bucket_indices(tensors, cap_bytes):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            jobs.append(
                (idx, flat, dist.broadcast(flat, src, group=group.torch_group, async_op=True))
            )
        for idx, flat, work in jobs:
            work.wait()
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
                offset += n


def _digest(names: Sequence[str]) -> int:
    # 56 bits, so that the digest and its negation fit an int64; Python's hash() is
    # salted per process and useless across ranks.
    h = hashlib.blake2b("\0".join(names).encode(), digest_size=7).digest()
    return int.from_bytes(h, "little")


def check_same_names(names: Sequence[str], group: ProcessGroup, what: str = "param sites") -> None:
    """Raise on every rank if ``names`` differ across ranks.

    One small all-reduce compares digests; only on a mismatch are the names gathered, to
    say which ranks have which.

    :param names: this rank's names, in an order that does not depend on the rank
        (sort them first if it might).
    :param group: the process group.
    :param str what: what the names are, for the message.
    :raises RuntimeError: on every rank, naming the differences, if any rank differs.
    """
    d = _digest(names)
    t = torch.tensor([d, -d], dtype=torch.int64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.torch_group)
    if t.tolist() == [d, -d]:
        return
    gathered: list[list[str] | None] = [None] * group.world_size
    dist.all_gather_object(gathered, list(names), group=group.torch_group)
    ref = set(gathered[0])
    lines = []
    for rank, other in enumerate(gathered[1:], start=1):
        extra, missing = sorted(set(other) - ref), sorted(ref - set(other))
        if extra:
            lines.append(f"rank {rank} has {extra}, rank 0 does not")
        if missing:
            lines.append(f"rank 0 has {missing}, rank {rank} does not")
        if not extra and not missing and list(other) != list(gathered[0]):
            lines.append(f"rank {rank} lists them in a different order than rank 0")
    raise RuntimeError(
        f"{what} differ across ranks: " + "; ".join(lines) + ". Every rank must run the "
        "same model and guide and create the same params (do not branch on the rank or "
        "on the data when creating params)."
    )


def all_reduce_scalars(
    values: Sequence[float], group: ProcessGroup, op: str = "sum"
) -> list[float]:
    """Reduce a few Python numbers over ranks in one collective.

    :param values: this rank's numbers.
    :param group: the process group.
    :param str op: ``"sum"``, ``"mean"``, ``"min"`` or ``"max"``.
    :returns: the reduced numbers, the same on every rank.
    """
    if op not in ("sum", "mean", "min", "max"):
        raise ValueError(f"op must be 'sum', 'mean', 'min' or 'max', got {op!r}")
    if not group.is_distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=group.device)
    reduce_op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}.get(op, dist.ReduceOp.SUM)
    dist.all_reduce(t, op=reduce_op, group=group.torch_group)
    if op == "mean":
        t /= group.world_size
    return t.tolist()


def all_ranks(flag: bool, group: ProcessGroup) -> bool:
    """``True`` on every rank if ``flag`` is true on every rank (for agreed decisions).

    :param bool flag: this rank's vote.
    :param group: the process group.
    """
    return all_reduce_scalars([float(bool(flag))], group, op="min")[0] > 0


def any_rank(flag: bool, group: ProcessGroup) -> bool:
    """``True`` on every rank if ``flag`` is true on some rank (for agreed decisions).

    :param bool flag: this rank's vote.
    :param group: the process group.
    """
    return all_reduce_scalars([float(bool(flag))], group, op="max")[0] > 0

"""Collectives: bucketed gradient all-reduce, parameter broadcast, agreed decisions.

Everything here is called by every rank of a :class:`~distsvi.distributed.ProcessGroup`
in the same order (a collective that only some ranks reach hangs). Gradients travel in
contiguous buckets of about ``bucket_cap_mb``, one asynchronous collective per bucket
(DESIGN.md invariant 6); decisions that change control flow are all-reduced before any
rank acts on them (invariant 4).
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
    costs no collective of its own unless no bucket can carry it.

    :param tensors: the tensors to average, identical in shape and order on all ranks.
    :param buckets: their split, from :func:`bucket_indices`.
    :param trailer: a 1-d float tensor to average along with them.
    :param group: the process group.
    :param float busy_wait_s: poll for completion this long before blocking (see
        :func:`wait_all`; for CPU collectives, where waiting blocks the host).
    :returns: ``(averaged, trailer)``: views of the averaged values in the order of
        ``tensors``, and the averaged trailer followed by one more number, the sum of all
        averaged values, which is finite only if every one is. A non-finite value on any
        rank makes the sum over ranks non-finite, so whether to skip a step is decided the
        same on every rank without a further collective.
    """
    carrier = _trailer_bucket(tensors, buckets, trailer)
    flats, works = [], []
    for b, idx in enumerate(buckets):
        parts = [tensors[i].reshape(-1) for i in idx]
        if b == carrier:
            parts.append(trailer.to(parts[0].dtype))
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        works.append(dist.all_reduce(flat, group=group.torch_group, async_op=True))
        flats.append(flat)
    if carrier < 0:
        flat = trailer.clone()
        works.append(dist.all_reduce(flat, group=group.torch_group, async_op=True))
        flats.append(flat)
    wait_all(works, busy_wait_s)
    averaged: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for b, idx in enumerate(buckets):
        flat = flats[b].div_(group.world_size)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            averaged[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    if carrier < 0:
        flats[-1].div_(group.world_size)
    trailer_out = flats[carrier][-trailer.numel() :].to(trailer.dtype)
    # A sum is non-finite if any term is (or if finite terms overflow, which a step should
    # not survive either), and is cheaper than an elementwise test.
    total = torch.stack([f.sum().to(trailer.device, trailer.dtype) for f in flats]).sum()
    return averaged, torch.cat((trailer_out, total.reshape(1)))


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

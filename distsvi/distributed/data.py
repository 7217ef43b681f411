"""Data for one rank: seeds, shards, and the handler that narrows plates to a shard.

Two ways to feed data, both giving each rank's loss as an unbiased estimate of the
full-data loss (DESIGN.md invariant 1):

- in-memory tensors and ``plate(name, size, subsample_size=B)``: :class:`ShardedPlates`
  fills the plate's indices from this rank's shard of ``range(size)``;
- a ``Dataset`` read through :class:`DistributedLoader` (a ``DistributedSampler``), whose
  batches come with their indices for ``plate(name, size, subsample=idx)``.

Shuffling is one permutation per (seed, epoch), the same on every rank; Monte-Carlo
noise differs per rank through :func:`rank_seed` (invariant 5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import distsvi
from distsvi.params import rows as _rows
from distsvi.poutine.runtime import Messenger

from .process_group import ProcessGroup


def _mix(*ints: int) -> int:
    h = hashlib.blake2b(repr(ints).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s Monte-Carlo noise in a run seeded with ``seed``.

    Rank 0 keeps ``seed`` itself, so a run of world size 1 draws what a plain run with
    ``set_rng_seed(seed)`` draws; other ranks get well-separated seeds.

    :param int seed: the run's seed.
    :param int rank: the rank.
    :returns: a seed in ``[0, 2**32)`` for ``distsvi.set_rng_seed`` (NumPy's range).
    """
    return seed if rank == 0 else _mix(seed, rank) % 2**32


def seed_rank(seed: int, group: ProcessGroup) -> int:
    """Seed this rank's Monte-Carlo noise (``distsvi.set_rng_seed``) from the run seed.

    :param int seed: the run's seed.
    :param group: the process group.
    :returns: the seed used, :func:`rank_seed` of ``seed`` and the rank.
    """
    rank_specific = rank_seed(seed, group.rank)
    distsvi.set_rng_seed(rank_specific)
    return rank_specific


def epoch_permutation(size: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of ``range(size)`` for ``epoch``: a function of (seed, epoch) only,
    hence the same on every rank and after a restart.

    :param int size: the number of datapoints.
    :param int seed: the run's seed.
    :param int epoch: the epoch.
    :returns: a CPU ``LongTensor`` permutation.
    """
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(size, generator=g, device="cpu")


def shard_indices(
    size: int, rank: int, world_size: int, seed: int | None = None, epoch: int = 0
) -> Tensor:
    """This rank's shard of ``range(size)``: disjoint across ranks and covering.

    Shard sizes differ by at most one. With ``seed=None`` shards are contiguous and in
    order (for evaluation); otherwise rank ``r`` takes every ``world_size``-th element of
    :func:`epoch_permutation` from position ``r``.

    :param int size: the number of datapoints.
    :param int rank: this rank.
    :param int world_size: the number of ranks.
    :param seed: the run's seed, or ``None`` for contiguous shards.
    :param int epoch: the epoch, used with ``seed``.
    :returns: a CPU ``LongTensor`` of indices.
    """
    if seed is None:
        base, extra = divmod(size, world_size)
        start = rank * base + min(rank, extra)
        return torch.arange(start, start + base + (rank < extra), device="cpu")
    return epoch_permutation(size, seed, epoch)[rank::world_size]


def shard_tensors(
    *tensors: Tensor, group: ProcessGroup, seed: int | None = None, epoch: int = 0, dim: int = 0
) -> tuple[Tensor, ...]:
    """Keep this rank's shard of in-memory tensors (rows chosen by :func:`shard_indices`).

    :param tensors: tensors of the same size along ``dim``.
    :param group: the process group.
    :param seed: shuffle with this run seed, or ``None`` for contiguous shards.
    :param int epoch: the epoch, used with ``seed``.
    :param int dim: the dimension of datapoints.
    :returns: the shards, in the order given.

    Example::

        x_val, y_val = shard_tensors(x_val, y_val, group=group)
    """
    sizes = {t.size(dim) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"tensors to shard differ in size along dim {dim}: {sorted(sizes)}")
    idx = shard_indices(sizes.pop(), group.rank, group.world_size, seed, epoch)
    return tuple(t.index_select(dim, idx.to(t.device)) for t in tensors)


class _Walk:
    """Position of one sharded plate in its epochs: each step takes the next ``B``
    indices of this rank's shard; a new epoch (a new permutation) starts when fewer than
    ``B`` remain on the smallest shard, so every rank changes epoch on the same step."""

    def __init__(
        self, name: str, size: int, batch: int, group: ProcessGroup, seed: int, own: bool = False
    ) -> None:
        steps = (size // group.world_size) // batch
        if steps == 0:
            raise ValueError(
                f"plate {name!r} draws subsample_size={batch} of size={size} on "
                f"{group.world_size} ranks, but a rank's shard has only {size // group.world_size} "
                "datapoints. Lower subsample_size or use fewer ranks."
            )
        self.size, self.batch, self.steps_per_epoch = size, batch, steps
        self.group, self.seed, self.own = group, seed, own
        self.epoch, self.position = 0, 0
        self._shard: Tensor | None = None

    def next(self) -> tuple[Tensor, float]:
        # (beyond the end: a position saved by a run on fewer ranks, whose epochs are longer)
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position, self._shard = self.epoch + 1, 0, None
        if self._shard is None:
            rank, world = self.group.rank, self.group.world_size
            if self.own:
                # Sharded local params: this rank's own rows, reshuffled each epoch.
                block = shard_indices(self.size, rank, world)
                perm = epoch_permutation(len(block), _mix(self.seed, rank), self.epoch)
                self._shard = block[perm]
            else:
                self._shard = shard_indices(self.size, rank, world, self.seed, self.epoch)
        start = self.position * self.batch
        self.position += 1
        # Invariant 1: W * |S_r| / B, which is N / B when shards are equal.
        scale = self.group.world_size * len(self._shard) / self.batch
        return self._shard[start : start + self.batch], scale


class ShardedPlates(Messenger):
    """Narrow subsampling plates to this rank's shard (the ``"subsample"`` seam).

    For each plate named in ``plates`` that subsamples (``subsample_size=B``), fill its
    indices and scale:

    - training: the next ``B`` indices of this rank's shard of the epoch's permutation,
      scaled by ``W * |S_r| / B`` so the rank's loss is unbiased for the full data;
      the same indices are reused within a step (model and guide, every particle, and a
      rerun of the step) until :meth:`next_step`;
    - evaluation (``training=False``): the whole contiguous shard, scaled by ``W``, so that
      the loss divided by ``W`` and summed over ranks is the full-data loss.

    A plate given explicit ``subsample=idx`` keeps its indices and its usual
    ``size / len(idx)`` scale.

    With ``own_rows`` each rank owns a fixed contiguous block of each plate's rows (the
    evaluation shard; sizes differ by at most one): training draws its batches from
    that block only, reshuffled within it each epoch, and local params of the plate
    store only those rows (see :func:`distsvi.params.rows.owned_blocks`).

    :param group: the process group.
    :param plates: names of the plates to shard.
    :param int seed: the run's seed, for the shuffle.
    :param bool own_rows: shard local params' rows with the data.
    """

    def __init__(
        self, group: ProcessGroup, plates: Iterable[str], seed: int = 0, own_rows: bool = False
    ) -> None:
        super().__init__()
        self.group, self.plates, self.seed = group, frozenset(plates), seed
        self.own_rows = own_rows
        # Explicit indices are batches of this rank's own block (DistributedLoader with
        # own_rows): scaled by W * |block| / B rather than the plate's N / B.
        self.own_batches = False
        self._blocks: dict[str, tuple[int, int, int]] = {}
        self._owning: Any = None
        self.training = True
        self._walks: dict[str, _Walk] = {}
        self._drawn: dict[str, tuple[Tensor, float]] = {}
        self._taken: set[str] = set()  # plates whose batches the caller takes (take())

    def next_step(self, ahead: bool = False) -> None:
        """Let the next draw of each plate advance to new indices.

        :param ahead: draw them now, for every plate that has drawn before, rather than at
            the plate's first message: a compiled step then finds its indices made (a draw
            traced into the graph would recompile it for every data position).
        """
        self._drawn.clear()
        if ahead and self.training:
            for name, walk in self._walks.items():
                if name not in self._taken:
                    self._drawn[name] = walk.next()

    def take(self, name: str, size: int, batch: int) -> Tensor:
        """The next training batch of plate ``name``'s walk, for a caller that passes it
        as ``plate(name, size, subsample=idx)`` along with just those rows of the data
        (so that a rank need not hold the others). With ``own_rows`` these are rows of
        the rank's own block, scaled as a drawn batch is (set :attr:`own_batches`)."""
        self._taken.add(name)
        return self._walk(name, size, batch).next()[0]

    def indices(self, name: str) -> Tensor | None:
        """The indices plate ``name`` drew in this step, or ``None`` if it drew none."""
        drawn = self._drawn.get(name)
        return None if drawn is None else drawn[0]

    def __enter__(self):
        if self.own_rows:
            self._owning = _rows.owned_blocks(self._blocks)
            self._owning.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._owning is not None:
                owning, self._owning = self._owning, None
                owning.__exit__(*exc)

    def _own(self, name: str, size: int) -> None:
        block = self._blocks.get(name)
        if block is None or block[0] != size:
            rows = shard_indices(size, self.group.rank, self.group.world_size)
            start = int(rows[0]) if len(rows) else 0
            block = self._blocks[name] = (size, start, start + len(rows))
        _rows._BLOCKS[name] = block

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "subsample" and msg["name"] in self.plates:
            kw = msg["kwargs"]
            if self.own_rows:
                self._own(msg["name"], kw["size"])
                if (
                    self.own_batches
                    and self.training
                    and msg["value"] is not None
                    and msg["name"] not in self._drawn
                ):
                    # A batch of this rank's own rows: invariant 1's W * |block| / B, which
                    # differs from the plate's N / B when blocks are uneven.
                    _, start, stop = self._blocks[msg["name"]]
                    msg["scale"] = self.group.world_size * (stop - start) / len(msg["value"])
                    return
            # In training a plate without subsample_size is evaluated whole on every rank.
            if self.training and kw["subsample_size"] >= kw["size"] and msg["value"] is None:
                return
            drawn = self._drawn.get(msg["name"])
            if drawn is not None and (msg["value"] is None or msg["value"] is drawn[0]):
                msg["value"], msg["scale"] = drawn  # drawn already in this step
                return
            self._fill(msg)

    # Under SVI(compile=True) the draw runs eagerly: traced, it would be recompiled for
    # every new data position.
    @torch.compiler.disable
    def _fill(self, msg: dict[str, Any]) -> None:
        name = msg["name"]
        drawn = self._drawn.get(name)
        if msg["value"] is not None and (drawn is None or msg["value"] is not drawn[0]):
            return  # explicit indices: the plate scales them itself
        if drawn is None:
            drawn = self._draw(name, msg["kwargs"]["size"], msg["kwargs"]["subsample_size"])
            self._drawn[name] = drawn
        msg["value"], msg["scale"] = drawn

    def _draw(self, name: str, size: int, batch: int) -> tuple[Tensor, float]:
        if not self.training:
            return shard_indices(size, self.group.rank, self.group.world_size), float(
                self.group.world_size
            )
        return self._walk(name, size, batch).next()

    def _walk(self, name: str, size: int, batch: int) -> _Walk:
        walk = self._walks.get(name)
        if walk is None or (walk.size, walk.batch) != (size, batch):
            if walk is not None:
                raise ValueError(
                    f"plate {name!r} changed from size={walk.size}, subsample_size="
                    f"{walk.batch} to size={size}, subsample_size={batch} between training "
                    "steps. Sharded training plates need a fixed size and subsample_size; "
                    "give other data sets their own plate name."
                )
            walk = _Walk(name, size, batch, self.group, self.seed, self.own_rows)
            self._walks[name] = walk
        return walk

    def state_dict(self) -> dict[str, Any]:
        """The data position of every sharded plate, for checkpoints."""
        return {
            "seed": self.seed,
            "plates": {
                n: {"size": w.size, "batch": w.batch, "epoch": w.epoch, "position": w.position}
                for n, w in self._walks.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the data positions saved by :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self._walks.clear()
        self._drawn.clear()
        for name, s in state["plates"].items():
            walk = _Walk(
                name, int(s["size"]), int(s["batch"]), self.group, self.seed, self.own_rows
            )
            walk.epoch, walk.position = int(s["epoch"]), int(s["position"])
            self._walks[name] = walk


class _BlockSampler(torch.utils.data.Sampler):
    """This rank's own block of ``range(size)``, shuffled per epoch as :class:`_Walk` does,
    cut to the batches that fill on every rank's block."""

    def __init__(
        self, size: int, batch: int, group: ProcessGroup, shuffle: bool, seed: int
    ) -> None:
        self.block = shard_indices(size, group.rank, group.world_size)
        self.count = (size // group.world_size) // batch * batch
        self.seed, self.shuffle, self.epoch = _mix(seed, group.rank), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        rows = self.block
        if self.shuffle:
            rows = rows[epoch_permutation(len(rows), self.seed, self.epoch)]
        return iter(rows[: self.count].tolist())


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class DistributedLoader:
    """This rank's minibatches of a ``Dataset``, with their indices.

    A ``DataLoader`` over a ``DistributedSampler``: each epoch is one permutation (from
    ``seed`` and the epoch) split into disjoint equal parts, one per rank, and every rank
    gets the same number of batches. Each iteration over the loader is one epoch and
    advances it (``set_epoch`` is called for you). Batches are ``(indices, batch)`` with
    ``indices`` a ``LongTensor`` for ``plate(name, len(dataset), subsample=indices)``,
    which scales the plate by ``len(dataset) / len(indices)``.

    :param dataset: a map-style dataset.
    :param int batch_size: datapoints per rank per step.
    :param group: the process group (default: world size 1).
    :param bool shuffle: shuffle each epoch.
    :param int seed: the run's seed, for the shuffle.
    :param bool drop_last: drop the datapoints that do not fill a batch on every rank
        (default); otherwise the sampler repeats some to pad.
    :param bool own_rows: rank ``r`` draws only from its own contiguous block of the rows
        (reshuffled within it each epoch), the block whose local params it stores under
        ``DataParallelSVI(local_params="sharded")``; every rank takes the same number of
        batches, those that fill on the smallest block.
    :param loader_kwargs: passed to ``DataLoader`` (``num_workers``, ``collate_fn``, ...).

    Example::

        loader = DistributedLoader(TensorDataset(x, y), batch_size=256, group=group)
        for epoch in range(10):
            for idx, (xb, yb) in loader:
                dp.step(xb, yb, idx)
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        group: ProcessGroup | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        own_rows: bool = False,
        **loader_kwargs: Any,
    ) -> None:
        group = group or ProcessGroup()
        indexed = _Indexed(dataset)
        if own_rows and group.is_distributed:
            self.sampler = _BlockSampler(len(indexed), batch_size, group, shuffle, seed)
        else:
            self.sampler = DistributedSampler(
                indexed, group.world_size, group.rank, shuffle=shuffle, seed=seed,
                drop_last=drop_last,
            )
        self.loader = DataLoader(
            indexed, batch_size, sampler=self.sampler, drop_last=drop_last, **loader_kwargs
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        yield from self.loader
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The epoch to resume at."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the epoch saved by :meth:`state_dict`."""
        self.epoch = int(state["epoch"])

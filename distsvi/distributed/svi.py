"""DataParallelSVI: one :class:`~distsvi.infer.SVI` per rank, one step for all ranks."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from distsvi.infer import SVI
from distsvi.params import _PARAM_STORE, param_with_module_name
from distsvi.params import rows as _rows

from .data import ShardedPlates
from .process_group import ProcessGroup, current
from .reduce import (
    BucketReducer,
    all_reduce_scalars,
    broadcast_,
    bucket_indices,
    check_same_names,
)
from .shm import shared_memory_reducer

logger = logging.getLogger(__name__)


class DataParallelSVI:
    """Run ``svi`` data-parallel: every rank steps on its own shard and all take the same
    step.

    It is stage 3 of the SVI step's gradient path (``svi.reduce_grads``; see
    :class:`~distsvi.infer.SVI`) and wraps :meth:`step` and :meth:`evaluate_loss` in a
    :class:`~distsvi.distributed.data.ShardedPlates` handler. At every step, after
    backward:

    - the gradients of the params touched are averaged over ranks in buckets of about
      ``bucket_cap_mb``, one asynchronous all-reduce per bucket (CPU ranks of one machine
      average through shared memory instead; see ``shared_memory``); the loss rides
      along, so :meth:`step` returns the loss averaged over ranks;
    - buckets follow a layout of param names agreed by all ranks; a rank whose set of
      params differs from it (at the first step, when params are created lazily) says so
      with a flag in that same collective, so no rank acts alone. Then the sets are
      compared across ranks (an error naming the differing params is raised on every
      rank), params seen for the first time are broadcast from rank 0, and the step is run
      again with the same subsample and the same random draws, so that even the first
      update uses gradients computed at rank 0's values on every rank (one extra forward
      and backward each time new params appear). Replaying the draws makes a resumed
      run's first step, which is such a rerun, the step the uninterrupted run took;
    - a non-finite loss or gradient on any rank makes the step skipped on every rank
      (counted in :attr:`num_skipped`); ``max_bad_steps`` in a row raise
      ``FloatingPointError`` on every rank;
    - buffers of the modules registered with :func:`distsvi.module` whose params
      the step touched (BatchNorm's running statistics, say) are broadcast from rank 0
      after the step, as ``DistributedDataParallel`` does before each forward, so every
      rank ends each step with the same state (one collective per dtype when such buffers
      exist, none otherwise).

    With world size 1 nothing is wrapped: :meth:`step` is ``svi.step``, bit for bit, and
    plates draw as they would without it (:meth:`evaluate_loss` still evaluates all the
    data), unless ``walk_epochs`` is set. ``SVI(compile=True)`` works unchanged: the shard
    draws stay outside the graph.
    With several buckets, a bucket's all-reduce starts during backward as soon as its
    gradients are all produced (``overlap_backward``; see
    :class:`~distsvi.distributed.reduce.BucketReducer`): buckets follow the reverse of the
    params' order of use, so the first ones fill first and their communication overlaps
    the rest of backward, as in ``DistributedDataParallel``. The bucket that carries the
    loss starts after backward.
    Per-rank Monte-Carlo noise comes from seeding each rank with
    :func:`~distsvi.distributed.rank_seed` (see :func:`~distsvi.distributed.seed_rank`).

    :param svi: the :class:`~distsvi.infer.SVI` to run; its ``reduce_grads`` must be free.
    :param group: the process group (default: the running one, or world size 1).
    :param shard_plates: names of the plates whose ``subsample_size`` draws from this
        rank's shard.
    :param float bucket_cap_mb: the size of a gradient bucket, in MiB.
    :param int seed: the run's seed, for the data shuffle.
    :param int max_bad_steps: how many non-finite steps in a row stop training.
    :param str local_params: how local params (one row per datapoint of a sharded plate,
        e.g. AutoNormal's locals) are kept. ``"replicated"`` (default): every rank holds
        all rows and their gradients are averaged with the globals', so the optimizer
        steps every row (``local_updates="lazy"`` acts as ``"dense"`` here).
        ``"sharded"``: rank ``r`` owns a fixed contiguous block of the rows (sizes differ
        by at most one) and stores only those rows' params and optimizer state; its
        batches come from its block only (reshuffled within it each epoch, scaled by
        ``W * |block| / B``); the rows' gradients are never all-reduced: the rank applies
        them, divided by ``W``, itself, so ``sharded`` with ``local_updates="dense"`` ends
        with the params ``replicated`` gives, and ``"lazy"`` steps only the batch's rows.
        Locals start from each rank's own init of its rows (the same numbers as
        replicated for a deterministic ``init_loc_fn``). Reading the locals outside
        training steps and validation (``Predictive``, ``median``) sees this rank's rows.
    :param float busy_wait_ms: on CPU (Gloo), poll for the gradient all-reduce for up to
        this long before blocking; a blocked rank's idle core is slow to wake on virtual
        machines (see :func:`~distsvi.distributed.reduce.wait_all`). 0 blocks at once;
        ignored on GPU, where waiting does not block the host.
    :param bool overlap_backward: start a bucket's all-reduce during backward once its
        gradients are ready. Used only when the loss runs one backward per step (an ELBO
        with ``num_particles=1`` or vectorized particles); a loss that runs backward more
        than once otherwise raises, so pass ``False`` for a custom ``loss_and_grads``
        that does.
    :param bool walk_epochs: with world size 1 too, sharded plates walk an epoch
        permutation, as ranks do, instead of the plate's ``randperm(N)`` per step (which
        costs more than the step for large N). The job sets it; the default keeps a
        single process's :meth:`step` ``svi.step`` exactly.
    :param shared_memory: on CPU (Gloo), average the gradients through segments of
        ``/dev/shm`` that the ranks of one machine all map, instead of Gloo's TCP
        all-reduce (see :mod:`distsvi.distributed.shm`). ``None`` (default): when every
        rank can map every other rank's segment (on x86, whatever the size; elsewhere,
        whose barriers are Gloo all-reduces, when the gradients are too large for Gloo to
        gather in one bucket); ``True``: whatever their size; ``False``: never. Where some
        rank cannot map the segments (ranks on several machines) all ranks use Gloo. It
        does not overlap backward.

    Example::

        group = distsvi.distributed.init()
        distsvi.distributed.seed_rank(0, group)
        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
        dp = DataParallelSVI(svi, group)
        for step in range(1000):
            loss = dp.step(x, y)  # model: plate("data", len(x), subsample_size=256)
        val_loss = dp.evaluate_loss(x_val, y_val)
    """

    def __init__(
        self,
        svi: SVI,
        group: ProcessGroup | None = None,
        shard_plates: Iterable[str] = ("data",),
        bucket_cap_mb: float = 25.0,
        seed: int = 0,
        max_bad_steps: int = 10,
        busy_wait_ms: float = 20.0,
        overlap_backward: bool = True,
        local_params: str = "replicated",
        walk_epochs: bool = False,
        shared_memory: bool | None = None,
    ) -> None:
        if isinstance(shard_plates, str):
            shard_plates = (shard_plates,)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if not busy_wait_ms >= 0:
            raise ValueError(f"busy_wait_ms must be >= 0, got {busy_wait_ms}")
        if shared_memory not in (None, True, False):
            raise ValueError(f"shared_memory must be None, True or False, got {shared_memory!r}")
        if local_params not in ("replicated", "sharded"):
            raise ValueError(
                f"local_params must be 'replicated' or 'sharded', got {local_params!r}"
            )
        self.svi = svi
        self.group = group or current()
        self.local_params = local_params
        sharded = local_params == "sharded" and self.group.is_distributed
        self.shards = ShardedPlates(self.group, shard_plates, seed, own_rows=sharded)
        self.cap_bytes = int(bucket_cap_mb * 2**20)
        self.max_bad_steps = max_bad_steps
        self.busy_wait_s = busy_wait_ms / 1e3 if self.group.device.type == "cpu" else 0.0
        self.num_skipped = 0
        self.bad_in_a_row = 0
        self._seen: tuple[str, ...] = ()  # this rank's names at the last step
        self._layout: list[str] = []  # sorted names agreed by all ranks
        self._layout_params: list[Tensor] = []
        self._buckets: list[list[int]] = []
        # Overlap needs every gradient final when its hook fires: one backward per step.
        elbo = svi._elbo
        self.overlap_backward = bool(overlap_backward) and (
            getattr(elbo, "num_particles", 1) == 1 or getattr(elbo, "vectorize_particles", False)
        )
        self._reducer = BucketReducer([], [], self.group)
        self._synced: set[str] = set()  # params broadcast from rank 0 already
        self._modules: list[torch.nn.Module] = []  # whose buffers follow rank 0
        self._rerun = False
        self._loss = float("nan")
        self.walk_epochs = walk_epochs
        self.shared_memory = shared_memory
        self._store_version: int | None = None  # the param store's at the last step
        self._rng_devices = (
            [self.group.device.index or 0] if self.group.device.type == "cuda" else []
        )
        if self.group.is_distributed:
            if svi.reduce_grads is not None:
                raise ValueError(
                    "svi.reduce_grads is already set: another DataParallelSVI wraps this "
                    "SVI. Wrap a fresh SVI."
                )
            svi.reduce_grads = self._reduce_grads
            # Replicated local params: ranks touch different rows, so row gradients are
            # averaged as full gradients and the optimizer steps every row.
            svi.dense_rows = not sharded

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Take one SVI step on every rank with this rank's shard of the data.

        :returns: the loss averaged over ranks (an estimate of the full-data loss).
        """
        if not self.group.is_distributed and not self.walk_epochs:
            return self.svi.step(*args, **kwargs)
        self.shards.next_step(ahead=self.svi._compiled is not None)
        if not self.group.is_distributed:
            with self.shards:
                return self.svi.step(*args, **kwargs)
        # A rerun comes only when params appear: on the first step, or after a step that
        # created some. Only then is the RNG state worth copying.
        version = _PARAM_STORE.version
        rng = _get_rng(self._rng_devices) if version != self._store_version else None
        self._store_version = version
        with self.shards:
            self._step_once(args, kwargs)
            if self._rerun:  # new params were broadcast: redo the step at their values
                self._rerun = False
                if rng is not None:
                    _set_rng(rng, self._rng_devices)
                self._step_once(args, kwargs)
                if self._rerun:
                    self._rerun = False
                    raise RuntimeError(
                        "new params appeared again when the step was rerun; a model and "
                        "guide must create the same params every time they run"
                    )
        if self._modules:
            buffers = [b for m in self._modules for b in m.buffers()]
            if buffers:
                broadcast_(buffers, self.group, self.cap_bytes)
        return self._loss

    def _step_once(self, args: tuple, kwargs: dict) -> None:
        self._reducer.arm()  # buckets may start during this step's backward
        try:
            self.svi.step(*args, **kwargs)
        finally:
            self._reducer.disarm()

    @property
    def allreduce_bytes(self) -> int:
        """Bytes each training step all-reduces (the gradient buckets and the loss/flag
        trailer); 0 in one process."""
        if not self.group.is_distributed:
            return 0
        grads = sum(p.numel() * p.element_size() for p in self._layout_params)
        return grads + 2 * 4

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The loss on the full data passed, shared out over ranks.

        Each rank evaluates its contiguous shard of every sharded plate under
        ``torch.no_grad()`` (all of it, whatever ``subsample_size`` says), scaled so the
        sum over ranks is the full-data loss; plates that do not subsample are evaluated
        whole on every rank and counted once.

        :returns: the full-data loss, the same on every rank.
        """
        self.shards.training = False
        self.shards.next_step()
        try:
            with self.shards:
                loss = self.svi.evaluate_loss(*args, **kwargs)
        finally:
            self.shards.training = True
            self.shards.next_step()
        if not self.group.is_distributed:
            return loss
        return all_reduce_scalars([loss / self.group.world_size], self.group)[0]

    def _reduce_grads(self, loss: Tensor, params: dict[str, Tensor]) -> Tensor | None:
        own = _rows.sharded_names()
        if own and not own.isdisjoint(params):
            # This rank's rows of sharded locals: never all-reduced; the rank applies its
            # rows' gradient divided by W, what the average over ranks would give them.
            mine = {n: p for n, p in params.items() if n in own}
            reported = self._reduce_grads(loss, {n: p for n, p in params.items() if n not in own})
            if reported is None:
                _skip(mine)
                return None
            for p in mine.values():
                if p.grad is not None:
                    p.grad.div_(self.group.world_size)
            return reported
        names = tuple(params)
        changed = names != self._seen
        self._seen = names
        layout = self._layout
        grads = [_grad_or_zeros(params.get(n), p) for n, p in zip(layout, self._layout_params)]
        trailer = torch.stack((loss.detach().reshape(()), loss.new_tensor(float(changed))))
        averaged, trailer = self._reducer.reduce(grads, trailer)
        # Sync point: the one host read of the step, the same numbers on every rank.
        mean_loss, any_changed, nonfinite = trailer.tolist()
        self._loss = mean_loss
        if any_changed > 0 and self._relayout(params):
            return _skip(params)
        if nonfinite:
            return self._bad_step(params)
        self.bad_in_a_row = 0
        for n, g in zip(layout, averaged):
            p = params.get(n)  # None for a param that every rank stopped touching
            if p is not None:
                p.grad = g
        return trailer[0]

    def _relayout(self, params: dict[str, Tensor]) -> bool:
        """Agree on the new set of params; return whether the step must be rerun."""
        layout = self._agreed_order(params)
        added = set(layout) - set(self._layout)
        new = sorted(added - self._synced)
        self._layout = layout
        self._layout_params = [params[n] for n in layout]
        # The same modules on every rank: they follow from the agreed names.
        self._modules = [
            m
            for name, m in sorted(_PARAM_STORE._modules.items())
            if any(n.startswith(param_with_module_name(name, "")) for n in layout)
        ]
        self._buckets = bucket_indices(self._layout_params, self.cap_bytes)
        self._reducer.close()
        self._reducer = shared_memory_reducer(
            self._layout_params, self.group, self.busy_wait_s, self.shared_memory
        ) or BucketReducer(
            self._layout_params,
            self._buckets,
            self.group,
            self.busy_wait_s,
            overlap=self.overlap_backward,
        )
        if new:
            # Invariant 3: rank 0's initial values, before any update uses them.
            broadcast_([params[n] for n in new], self.group, self.cap_bytes)
            self._synced.update(new)
        # Gradients of params outside the old layout were not reduced: rerun the step.
        self._rerun = bool(added)
        return self._rerun

    def _agreed_order(self, params: dict[str, Tensor]) -> list[str]:
        """The params in an order every rank agrees on: the reverse of their order of use
        (backward produces the last-used gradients first, so the first buckets fill first
        and their all-reduce overlaps the rest of backward), or sorted by name where the
        order of use differs between ranks."""
        used = list(reversed(params))
        try:
            check_same_names(used, self.group)
            return used
        except RuntimeError:  # every rank sees the same mismatch (one reduced digest)
            layout = sorted(params)
            check_same_names(layout, self.group)
            return layout

    def _bad_step(self, params: dict[str, Tensor]) -> None:
        """Skip this step on every rank (all ranks saw the same sums), or stop."""
        self.num_skipped += 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"non-finite loss or gradient on some rank at {self.bad_in_a_row} steps in a "
                f"row (max_bad_steps={self.max_bad_steps}); stopping on every rank. Lower "
                "the learning rate or check the model for invalid values."
            )
        logger.warning(
            "non-finite loss or gradient on some rank; step skipped on every rank "
            "(%d skipped, %d in a row)",
            self.num_skipped,
            self.bad_in_a_row,
        )
        return _skip(params)

    def state_dict(self) -> dict[str, Any]:
        """Data positions and skip counters, for checkpoints (params and optimizer state
        are saved with the param store and the optimizer)."""
        return {
            "shards": self.shards.state_dict(),
            "num_skipped": self.num_skipped,
            "bad_in_a_row": self.bad_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self.shards.load_state_dict(state["shards"])
        self.num_skipped = int(state["num_skipped"])
        self.bad_in_a_row = int(state["bad_in_a_row"])


def _grad_or_zeros(p: Tensor | None, like: Tensor) -> Tensor:
    if p is None:
        return torch.zeros_like(like)
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _skip(params: dict[str, Tensor]) -> None:
    for p in params.values():
        p.grad = None


def _get_rng(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state: tuple, devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)

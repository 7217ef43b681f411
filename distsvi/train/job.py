"""A job built from its config for one rank: data, model, guide, loss, optimizer and the
data-parallel SVI, plus the operations the loop, ``eval`` and ``predict`` share (a
training step, validation, posterior predictive samples)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch.utils.data import TensorDataset

import distsvi
from distsvi import distributed, poutine
from distsvi import optim as optim_lib
from distsvi.distributed.data import DistributedLoader, rank_seed
from distsvi.infer import (
    SVI,
    Predictive,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    autoguide,
)
from distsvi.nn import PyroModule
from distsvi.params import rows as _rows
from distsvi.train.config import TrainConfig, check_batch, check_model_signature, compiles
from distsvi.train.data import Split, load_data
from distsvi.train.errors import ConfigError, RunFailed, first_line, import_target
from distsvi.train.heldout import heldout_loss, local_sites, refitted, shard_rows
from distsvi.train.models import BUILTIN
from distsvi.train.names import AUTOGUIDES, SCHEDULERS

LOSSES = {
    "Trace_ELBO": Trace_ELBO,
    "TraceMeanField_ELBO": TraceMeanField_ELBO,
    "TraceGraph_ELBO": TraceGraph_ELBO,
}


@dataclass
class Job:
    """Everything built from a config for one rank, before the first step."""

    cfg: TrainConfig
    group: distributed.ProcessGroup
    split: Split
    model_obj: Any
    model: Callable
    guide: Callable
    optim: Any
    scheduler: Any
    svi: SVI
    dp: distributed.DataParallelSVI
    monitor: GradMonitor
    loader: DistributedLoader | None
    total_steps: int
    steps_per_epoch: int
    epoch: int = 0
    position: int = 0
    _batches: Iterator | None = field(default=None, repr=False)
    # Per-datapoint latent sites of a non-amortized guide: None until first asked.
    local: tuple | None = field(default=None, repr=False)
    # run.compile: steps run through torch.compile from the job's second step on.
    compile: bool = False

    def step(self) -> float:
        """One training step on this rank's next minibatch; the loss averaged over ranks."""
        args, kwargs = self.inputs()
        loss = self.dp.step(*args, **kwargs)
        if self.compile and self.svi._compile_options is None:
            # Compiled from the next step on: this first one creates the params and, on
            # several ranks, reruns at rank 0's values (DataParallelSVI), eagerly.
            self.svi._compile_options = {}
        return loss

    def inputs(self) -> tuple[tuple, dict[str, Any]]:
        """The next step's ``(args, kwargs)`` for the model: the training tensors with the
        "data" plate's ``subsample_size`` (the sharded plates draw this rank's rows), or
        the loader's next batch of rows with their indices."""
        size, batch_size = self.split.num_train, self.cfg.run.batch_size
        if self.loader is not None:
            idx, batch = self._next_batch()
            return tuple(batch), {"size": size, "subsample": idx}
        if self.split.is_block:  # this rank holds its own block of rows only
            idx = self.dp.shards.take("data", size, batch_size)
            return self.split.rows(idx), {"size": size, "subsample": idx}
        return self.split.train, {"size": size, "subsample_size": batch_size}

    def probe(self, count: int = 1) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for the model on the first ``count`` training rows this rank
        holds: a run of model or guide that neither draws rows nor advances the data."""
        start = None
        if self.dp.shards.own_rows and not self.split.is_block:  # rows of this rank's block
            start = _own_block(self.split.num_train, self.group)[0]
        return self.split.head(count, start)

    @contextlib.contextmanager
    def probing(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """A block for a run of model and guide on a batch of rows this rank holds (yields
        its ``(args, kwargs)``): without gradients, off the random stream, and under the
        shard handler recording rows as a step does, so that sharded local params are
        made and read as this rank's rows and known as local params."""
        with (
            torch.random.fork_rng(devices=cuda_devices(self.group)),
            torch.no_grad(),
            self.dp.shards,
            _rows.record_rows(),
        ):
            yield self.probe(self.cfg.run.batch_size)

    def _next_batch(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._batches is None:
            self.loader.set_epoch(self.epoch)
            self._batches = islice(iter(self.loader), self.position, None)
        try:
            idx, batch = next(self._batches)
        except StopIteration:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            return self._next_batch()
        self.position += 1
        device = self.group.device
        return idx.to(device), [t.to(device) for t in batch]

    def data_state(self) -> dict[str, Any]:
        """Where the data stands: the sharded plates' walk, or the loader's epoch and batch."""
        return {"parallel": self.dp.state_dict(), "epoch": self.epoch, "position": self.position}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.dp.load_state_dict(state["parallel"])
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None

    @property
    def skipped_steps(self) -> int:
        return self.dp.num_skipped + self.monitor.skipped

    def current_epoch(self, step: int) -> int:
        return self.epoch if self.loader is not None else step // self.steps_per_epoch


class GradMonitor:
    """Stage 4 of the SVI step's gradient path (``svi.grad_hook``, after the cross-rank
    average): measures the gradient norm, clips it, and in a single process skips steps
    whose loss or gradients are not finite. Across ranks
    :class:`~distsvi.distributed.DataParallelSVI` has skipped those already, the same on
    every rank (its flags ride in the gradient all-reduce); in one process its policy
    (count, skip, stop after ``max_bad_steps`` in a row) is applied here, so both share
    one policy.

    :param policy: the DataParallelSVI whose skip/stop policy applies (None: one
        process, counting skipped steps in :attr:`skipped` only).
    """

    def __init__(self, clip_norm: float | None, policy: Any = None) -> None:
        self.clip_norm, self.policy = clip_norm, policy
        # Across ranks the skip decision and the host read were made in the all-reduce.
        self.reduced = policy is not None and policy.group.is_distributed
        self.skipped = 0
        self.grad_norm = torch.zeros(())

    def __call__(
        self, loss: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor | float | None:
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not grads:
            return loss
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.grad_norm = norm.detach()  # a tensor: read on log steps only
        if not self.reduced:
            # Sync point: the step's one host read, loss and gradient norm together, to
            # decide whether to skip; SVI returns the loss read here.
            loss_value, norm_value = torch.stack(
                (loss.detach().reshape(()).to(norm.dtype), norm)
            ).tolist()
            if not math.isfinite(loss_value + norm_value):
                if self.policy is not None:
                    return self.policy._bad_step(params)  # raises after max_bad_steps in a row
                self.skipped += 1
                return None
            if self.policy is not None:
                self.policy.bad_in_a_row = 0
            loss = loss_value
        if self.clip_norm is not None:
            torch._foreach_mul_(grads, torch.clamp(self.clip_norm / (norm + 1e-6), max=1.0))
        return loss


def build_model(cfg: TrainConfig) -> tuple[Any, Callable]:
    """The model object (a class instance, or the function itself) and the model callable."""
    if cfg.model.name in BUILTIN:
        target = BUILTIN[cfg.model.name]
    else:
        _, target = import_target(cfg.model.name, "model.name")
    if isinstance(target, type):
        try:
            obj = target(**cfg.model.options)
        except TypeError as e:
            raise ConfigError("model.options", f"{cfg.model.name}: {e}") from None
        except Exception as e:
            if cfg.model.name not in BUILTIN:
                raise  # the user's class: its traceback shows where
            raise ConfigError(
                "model.options",
                f"{cfg.model.name} cannot be built with {cfg.model.options}: "
                f"{type(e).__name__}: {first_line(e)}",
            ) from None
        if callable(getattr(obj, "model", None)):
            return obj, obj.model
        if isinstance(obj, PyroModule):
            return obj, obj  # its forward is the model
        raise ConfigError(
            "model.name",
            f"{cfg.model.name} has no model method; give it one, or make it a "
            "distsvi.nn.PyroModule whose forward is the model",
        )
    if not callable(target):
        raise ConfigError("model.name", f"{cfg.model.name} is not callable")
    return target, target


def build_guide(cfg: TrainConfig, model_obj: Any, model: Callable) -> Callable:
    """An autoguide of ``model``, the model class's own ``guide``, the user's function, or
    the user's PyroModule class (built with ``guide.options``)."""
    name = cfg.guide.name
    if name in AUTOGUIDES:
        try:
            return getattr(autoguide, name)(model, **cfg.guide.options)
        except TypeError as e:
            raise ConfigError("guide.options", f"{name}: {e}") from None
    if name == "model":
        if not callable(getattr(model_obj, "guide", None)):
            raise ConfigError("guide.name", f"'model' needs a guide method on {cfg.model.name}")
        return model_obj.guide
    _, guide = import_target(name, "guide.name")
    if isinstance(guide, type) and issubclass(guide, PyroModule):
        try:
            return guide(**cfg.guide.options)
        except TypeError as e:
            raise ConfigError("guide.options", f"{name}: {e}") from None
    return guide


def build_optim(cfg: TrainConfig) -> tuple[Any, Any]:
    """The optimizer (a scheduler when ``schedule.name`` is set) and the scheduler or None."""
    o = cfg.optim
    base = {"lr": o.lr, **o.options}

    def per_param(name: str) -> dict[str, Any]:
        args = dict(base)
        for prefix, extra in o.per_param.items():
            if name.startswith(prefix):
                args.update(extra)
        return args

    args: Any = per_param if o.per_param else base
    if cfg.schedule.name == "none":
        return getattr(optim_lib, o.name)(args, local_updates=o.local_updates), None
    torch_optim = getattr(torch.optim, o.name)
    scheduler = getattr(optim_lib, SCHEDULERS[cfg.schedule.name])(
        {"optimizer": torch_optim, "optim_args": args, **cfg.schedule.options},
        local_updates=o.local_updates,
    )
    return scheduler, scheduler


def build_job(cfg: TrainConfig, group: distributed.ProcessGroup) -> Job:
    """Load the data and build model, guide, loss, optimizer and the data-parallel SVI.

    The job owns the global param store: it starts empty.
    """
    distsvi.clear_param_store()
    split = load_data(cfg.data, seed_devices=cuda_devices(group))
    check_same_data(cfg.data.name, split, group)
    check_batch(cfg, split.num_train + split.num_val, group.world_size)
    if (
        cfg.dist.local_params == "sharded"
        and group.is_distributed
        and cfg.data.loader != "dataloader"
    ):
        # Each rank trains on its own block of rows only (the rows whose local params it
        # stores): the rest of the table is freed before anything is moved to the device.
        split.keep_block(*_own_block(split.num_train, group))
    split.train = tuple(t.to(group.device) for t in split.train)
    split.val = tuple(t.to(group.device) for t in split.val)
    model_obj, model = build_model(cfg)
    check_model_signature(model, "model.name", cfg.model.name, num_tensors=len(split.train))
    if isinstance(model_obj, torch.nn.Module):
        model_obj.to(group.device)
    guide = build_guide(cfg, model_obj, model)
    if isinstance(guide, torch.nn.Module) and guide is not model_obj:
        guide.to(group.device)
    loss_cfg = cfg.loss
    loss = LOSSES[loss_cfg.name](
        num_particles=loss_cfg.num_particles,
        vectorize_particles=loss_cfg.vectorize_particles,
        max_plate_nesting=loss_cfg.max_plate_nesting
        if loss_cfg.max_plate_nesting is not None
        else float("inf"),
    )
    optim, scheduler = build_optim(cfg)
    svi = SVI(model, guide, optim, loss)
    dp = distributed.DataParallelSVI(
        svi,
        group,
        shard_plates=("data",),
        bucket_cap_mb=cfg.dist.bucket_cap_mb,
        seed=cfg.run.seed,
        max_bad_steps=cfg.run.max_bad_steps,
        local_params=cfg.dist.local_params,
        walk_epochs=True,
        shared_memory={"auto": None, "true": True, "false": False}[cfg.dist.shared_memory.lower()],
    )
    monitor = svi.grad_hook = GradMonitor(cfg.optim.clip_norm, policy=dp)
    # Batches of a rank's own block come as explicit indices (the loader's, or taken from
    # the walk by Job.inputs): scaled by W * |block| / B.
    dp.shards.own_batches = dp.shards.own_rows
    loader = None
    rows_per_step = cfg.run.batch_size * group.world_size
    steps_per_epoch = max(1, split.num_train // rows_per_step)
    if cfg.data.loader == "dataloader":
        loader = DistributedLoader(
            TensorDataset(*(t.cpu() for t in split.train)),
            cfg.run.batch_size,
            group,
            seed=cfg.run.seed,
            # Each new iterator draws a seed; from its own generator, not the training
            # stream, so that resuming mid-epoch draws what the uninterrupted run draws.
            generator=torch.Generator().manual_seed(cfg.run.seed),
            own_rows=cfg.dist.local_params == "sharded",
        )
        steps_per_epoch = len(loader)
    total = cfg.run.steps if cfg.run.steps > 0 else cfg.run.epochs * steps_per_epoch
    job = Job(
        cfg,
        group,
        split,
        model_obj,
        model,
        guide,
        optim,
        scheduler,
        svi,
        dp,
        monitor,
        loader,
        total,
        steps_per_epoch,
    )
    job.compile = compiles(cfg.run, total)
    return job


def _own_block(n: int, group: distributed.ProcessGroup) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous block of ``n`` rows."""
    rows = distributed.shard_indices(n, group.rank, group.world_size)
    start = int(rows[0]) if len(rows) else 0
    return start, start + len(rows)


def validate(job: Job, seed: int) -> float:
    """The full validation set's negative ELBO, summed over ranks' shards (invariant 7).

    Its Monte-Carlo noise comes from its own seed, so validating does not move the
    training random stream (a resumed run then draws what the uninterrupted one draws).
    """
    with torch.random.fork_rng(devices=cuda_devices(job.group)):
        distsvi.set_rng_seed(rank_seed(seed, job.group.rank))
        # The sharded "data" plate evaluates this rank's whole shard, whatever subsample_size says.
        batch = min(job.cfg.run.batch_size, job.split.num_val)
        local = local_latents(job)
        if not local:
            return job.dp.evaluate_loss(
                *job.split.val, size=job.split.num_val, subsample_size=batch
            )
        # Per-datapoint latents: each rank refits and scores its block of held-out rows.
        g = job.group
        rows = shard_rows(job.split.val, g.rank, g.world_size)
        loss = heldout_loss(job.model, job.guide, local, job.probe(), rows, job.cfg.optim.lr)
        return distributed.all_reduce_scalars([loss], g)[0]  # the blocks' sum


def local_latents(job: Job) -> tuple:
    """The model's per-datapoint latent sites whose guide params are per training row
    (see :mod:`distsvi.train.heldout`); empty when held-out rows can be scored directly."""
    if job.local is None:
        job.local = local_sites(job.model, job.guide, job.probe())
    return job.local


def cuda_devices(group: distributed.ProcessGroup) -> list[int]:
    """The CUDA device this rank draws random numbers on, for ``fork_rng`` (none on CPU)."""
    return [group.device.index or 0] if group.device.type == "cuda" else []


def posterior_predictive(job: Job, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Samples of every model sample site on the validation rows (observations left free)."""
    *inputs, _ = job.split.val
    kwargs = {"size": job.split.num_val}
    local = local_latents(job)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices(job.group)))
        distsvi.set_rng_seed(seed)
        model, guide = job.model, job.guide
        if local:  # fit the held-out rows' local latents first (distsvi.train.heldout)
            model, guide = stack.enter_context(
                refitted(model, guide, local, job.probe(), job.split.val, job.cfg.optim.lr)
            )
        stack.enter_context(torch.no_grad())
        guide_trace = poutine.trace(guide).get_trace(*inputs, None, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *inputs, None, **kwargs
        )
        sites = [name for name, site in model_trace.nodes.items() if site["type"] == "sample"]
        predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=sites)
        samples = predictive(*inputs, None, **kwargs)
    # Predictive draws all samples in one vectorized pass, which leaves a global site
    # (e.g. ``w``, one value for all rows) with a singleton dim for the data plate: give
    # every site the shape of one draw, after the samples dim.
    return {
        k: v.detach().cpu().reshape(num_samples, *model_trace.nodes[k]["value"].shape)
        for k, v in samples.items()
    }


def check_same_data(name: str, split: Split, group: distributed.ProcessGroup) -> None:
    """Every rank loaded the same data: compare a fingerprint (shapes, dtypes, two sums)
    across ranks, so that a loader that draws at random stops the job instead of training
    each rank on different rows."""
    if not group.is_distributed:
        return
    mine = _fingerprint(split.train + split.val)
    everyone: list[Any] = [None] * group.world_size
    torch.distributed.all_gather_object(everyone, mine)
    differ = [r for r, fp in enumerate(everyone) if fp != everyone[0]]
    if differ:
        raise RunFailed(
            f"data.name {name} returned different data on rank 0 and rank {differ[0]} "
            f"(shapes, dtypes, sums: {everyone[0]} vs {everyone[differ[0]]}); every rank must "
            "load the same rows: read them from a file, or draw them from a generator "
            "seeded by a loader argument (torch.Generator().manual_seed(seed))"
        )


def _fingerprint(tensors: tuple[torch.Tensor, ...]) -> list[tuple]:
    out = []
    chunk = 1 << 22  # float64 temporaries of 32 MB, whatever the data's size
    for t in tensors:
        flat = t.detach().reshape(-1)
        total = weighted = 0.0
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk].to("cpu", torch.float64)
            weights = torch.arange(start, start + part.numel(), dtype=torch.float64) % 1009 + 1
            total += float(part.sum())
            weighted += float((part * weights).sum())
        out.append((tuple(t.shape), str(t.dtype), (round(total, 6), round(weighted, 6))))
    return out


def first_non_finite(job: Job) -> str:
    """Where a diverged run went wrong: the first param (constrained or not) or sample
    site (value or log-prob) that is not finite, at the current params on this rank's
    data. The failure path only: it costs a trace of guide and model."""
    store = distsvi.get_param_store()
    for name, value in store.named_parameters():
        if not bool(torch.isfinite(value).all()):
            return f"first non-finite value: param {name!r} (unconstrained)"
        if not bool(torch.isfinite(store[name]).all()):
            return f"first non-finite value: param {name!r}"
    # A huge step can also leave a finite param outside its support (a scale that
    # underflowed to 0), which the next distribution refuses.
    for name, constraint in store.get_state()["constraints"].items():
        try:
            inside = bool(constraint.check(store[name].detach()).all())
        except (NotImplementedError, RuntimeError):
            continue
        if not inside:
            return f"param {name!r} left its support ({constraint}), e.g. a scale that reached 0"
    try:
        with job.probing() as (args, kwargs):
            guide = poutine.trace(job.guide).get_trace(*args, **kwargs)
            model = poutine.trace(poutine.replay(job.model, trace=guide)).get_trace(*args, **kwargs)
    except ValueError as e:
        return f"a distribution refused its parameters ({first_line(e)})"
    for where, trace in (("guide", guide), ("model", model)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not bool(torch.isfinite(torch.as_tensor(site["value"], dtype=torch.float64)).all()):
                return f"first non-finite value: {where} sample site {name!r}"
            try:
                log_prob = site["fn"].log_prob(site["value"])
            except ValueError as e:
                return f"{where} site {name!r} refused its value ({first_line(e)})"
            if not bool(torch.isfinite(log_prob).all()):
                return f"first non-finite log-prob: {where} site {name!r}"
    return "no non-finite param or log-prob found at the current params"

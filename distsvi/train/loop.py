"""One rank of a training job: the same code for one process or N under torchrun.

``train(cfg)`` reads top to bottom: join the process group, build the job (data, model,
guide, loss, optimizer), resume from the newest good checkpoint, loop, and leave the
group. ``evaluate`` and ``predict`` are ``distsvi eval`` and ``distsvi predict``.
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path
from typing import Any

import torch

import distsvi
from distsvi import distributed
from distsvi.distributed.data import rank_seed
from distsvi.train import checkpoint
from distsvi.train.config import TrainConfig, to_yaml
from distsvi.train.errors import ConfigError, RunFailed, first_line
from distsvi.train.job import Job, build_job, first_non_finite, posterior_predictive, validate
from distsvi.train.metrics import Progress, Timer, make_metrics, peak_memory_mb, reset_peak_memory
from distsvi.train.models import BUILTIN
from distsvi.train.process import DirLock


def _init(cfg: TrainConfig) -> distributed.ProcessGroup:
    """Threads, then the process group (world size 1 needs none)."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    return distributed.init(
        backend=None if cfg.dist.backend == "auto" else cfg.dist.backend,
        timeout=datetime.timedelta(seconds=cfg.dist.timeout_s),
        device=None if cfg.run.device == "auto" else cfg.run.device,
        pin_cpus=cfg.dist.pin_cpus,
    )


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run one rank of the job described by ``cfg``.

    :returns: on the main rank, the final figures (validation loss and the model's report);
        on other ranks, the final validation loss.

    Example::

        from distsvi.train import load_config, train
        train(load_config("quickstart", ["run.steps=500"]))
    """
    # The writing rank locks the checkpoint dir before it joins: a second job on the same
    # dir stops here, and its other ranks are stopped by torchrun.
    lock = DirLock(cfg.checkpoint.dir).acquire() if _env_rank() == 0 else None
    group = _init(cfg)
    metrics = progress = None
    done = False
    try:
        # Seeded before anything draws (module initialisation too); a resume overrides it.
        distsvi.set_rng_seed(rank_seed(cfg.run.seed, group.rank))
        job = build_job(cfg, group)
        ckpt = checkpoint.Checkpointer(
            cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep, group.is_main
        )
        ckpt.remove_stale_tmp()
        start = checkpoint.restore(job, ckpt)
        if group.is_main:
            Path(cfg.checkpoint.dir).mkdir(parents=True, exist_ok=True)
            checkpoint.write_text_atomic(to_yaml(cfg), Path(cfg.checkpoint.dir) / "config.yaml")
        metrics = make_metrics(group.is_main, cfg.log.dir)
        metrics.text("config", "```\n" + to_yaml(cfg) + "```")
        progress = Progress(cfg.run.progress, group.is_main, job.total_steps, start)
        rows_per_step = cfg.run.batch_size * group.world_size
        timer = Timer()
        val_loss = math.nan
        reset_peak_memory(group.device)  # perf/peak_mem_mb: training's peak, not loading's
        for step in range(start + 1, job.total_steps + 1):
            loss = take_step(job, first=step == start + 1)
            timer.tick()
            if job.scheduler is not None and step % cfg.schedule.every == 0:
                job.scheduler.step()
            last = step == job.total_steps
            values: dict[str, float] = {}
            if step % cfg.run.log_every == 0 or last:
                # Sync point (log steps only): the gradient norm stays on the device otherwise.
                values = {
                    "loss/train": loss,
                    "loss/train_per_datapoint": loss / job.split.num_train,
                    "optim/lr": float(job.optim.lr),
                    "optim/grad_norm": float(job.monitor.grad_norm),
                    "health/skipped_steps": float(job.skipped_steps),
                    **timer.read(rows_per_step),
                    "perf/allreduce_mb": job.dp.allreduce_bytes / 2**20,
                    "perf/peak_mem_mb": peak_memory_mb(group.device),
                }
            if (step % cfg.run.val_every == 0 or last) and job.split.num_val > 0:
                with timer.exclude():
                    val_loss = validate(job, cfg.run.seed + step)
                values["loss/val"] = val_loss
                values["loss/val_per_datapoint"] = val_loss / job.split.num_val
            if values:
                metrics.scalars(step, values)
                progress.update(step, values)
            if ckpt.should_save(step, job.total_steps):
                with timer.exclude():
                    checkpoint.save(job, ckpt, step)
        if start >= job.total_steps:
            progress.message(
                f"nothing to do: the checkpoint in {cfg.checkpoint.dir} is at step {start} of "
                f"{job.total_steps}. To train longer raise run.steps (e.g. "
                f"run.steps={2 * max(job.total_steps, 1)}); to start afresh set "
                "checkpoint.resume=never or a new checkpoint.dir"
            )
        results = {"loss/val": val_loss}
        if group.is_main:
            results.update(final_report(job, progress))
        done = True
        return results
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        _leave(done)
        if lock is not None:
            lock.release()


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _leave(done: bool) -> None:
    """Leave the process group: after a good run with every rank (a barrier); after a
    failure at once. A failed rank must not wait for peers that may wait on it (they are
    stopped by torchrun, or see the closed connection)."""
    if done:
        distributed.shutdown()


def take_step(job: Job, first: bool = False) -> float:
    """One step; a run that diverged stops with :class:`RunFailed` naming the first
    non-finite param or site (looked for only now, so the steps before pay nothing).

    A built-in model that fails on the first step of a process was given options or data
    it cannot run with: a :class:`ConfigError`, not a traceback of distsvi's code.
    """
    try:
        return job.step()
    except FloatingPointError as e:
        raise RunFailed(f"{e} {first_non_finite(job)}") from None
    except (RunFailed, ConfigError):
        raise
    except Exception as e:
        if first and job.cfg.model.name in BUILTIN:
            m, d = job.cfg.model, job.cfg.data
            raise ConfigError(
                "model.options",
                f"the built-in model {m.name} (options {m.options}) cannot run on data.name "
                f"{d.name} (options {d.options}): {type(e).__name__}: {first_line(e)}; give "
                "options and data that fit each other (see configs/ for working pairs)",
            ) from None
        if not isinstance(e, ValueError):
            raise
        # A distribution refusing a non-finite parameter (torch's constraint check) after a
        # diverging update is the same failure, found one step later.
        site = first_non_finite(job)
        if site.startswith("no non-finite"):
            raise
        raise RunFailed(
            f"training diverged: {site}. Lower optim.lr (now {job.cfg.optim.lr}) or set "
            "optim.clip_norm"
        ) from None


def final_report(job: Job, progress: Progress) -> dict[str, float]:
    """The model's figures on held-out rows (e.g. accuracy), printed by the main rank."""
    report = getattr(job.model_obj, "report", None)
    if report is None or job.split.num_val == 0:
        return {}
    samples = posterior_predictive(job, job.cfg.predict.num_samples, job.cfg.run.seed)
    figures = report(samples, *(t.cpu() for t in job.split.val))
    for name, value in figures.items():
        progress.message(f"{name}: {value:.4f}")
    return figures


def _job_from_checkpoint(cfg: TrainConfig, path: str) -> tuple[Job, dict[str, Any]]:
    group = _init(cfg)
    distsvi.set_rng_seed(rank_seed(cfg.run.seed, group.rank))
    job = build_job(cfg, group)
    state, _ = checkpoint.read_checkpoint(job, None, path)
    checkpoint.load_params(job, state, Path(path))
    return job, state


def evaluate(cfg: TrainConfig, path: str) -> float | None:
    """``distsvi eval``: the full validation loss of the checkpoint at ``path``, reduced over
    ranks when launched; the same figure training logs as ``loss/val`` at that step.

    :returns: the loss on the main rank, ``None`` elsewhere.
    """
    done = False
    try:
        job, state = _job_from_checkpoint(cfg, path)
        loss = validate(job, cfg.run.seed + int(state["step"]))
        done = True
        return loss if job.group.is_main else None
    finally:
        _leave(done)


def predict(
    cfg: TrainConfig, path: str, num_samples: int, out: str
) -> dict[str, torch.Size] | None:
    """``distsvi predict``: posterior predictive samples on the validation rows.

    Writes ``{"samples": {site: tensor [num_samples, num_val_rows, ...]}, "rows": LongTensor}``
    with ``torch.save`` (main rank only); ``rows`` are the validation rows' positions in the
    dataset.

    :returns: the shape of each site's samples on the main rank, ``None`` elsewhere.
    """
    done = False
    try:
        job, _ = _job_from_checkpoint(cfg, path)
        shapes = None
        if job.group.is_main:
            samples = posterior_predictive(job, num_samples, cfg.run.seed)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"samples": samples, "rows": job.split.val_rows}, out)
            shapes = {k: v.shape for k, v in samples.items()}
        done = True
        return shapes
    finally:
        _leave(done)

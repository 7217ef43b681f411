"""Checkpoints that exist whole or not at all, and resuming from the newest good one.

A checkpoint is one file ``step_00000100.pt`` holding only tensors and plain containers,
so it loads with ``torch.load(weights_only=True)`` (no pickled code runs on load):

============  ==============================================================
``format``    1
``step``      steps completed; ``epoch`` and ``data_position`` say where the
              data iterator stands
``seed``      the run seed; ``rng`` holds every rank's generator states as
              uint8 tensors (``torch``: ``[world_size, n]``; ``cuda`` likewise)
``params``    the param store, unconstrained values by name
``buffers``   module buffers by ``module$$$buffer`` name
``optim``     optimizer (and scheduler) state keyed by param name
``config``    the resolved config as YAML text; ``world_size``
============  ==============================================================
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

import distsvi
from distsvi import distributed
from distsvi.distributed.data import rank_seed
from distsvi.optim.optim import without_hyperparameters
from distsvi.train.config import TrainConfig, diff_configs, from_yaml, to_yaml
from distsvi.train.errors import ConfigError, RunFailed, first_line
from distsvi.train.job import Job, cuda_devices

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
REQUIRED = (
    "format",
    "step",
    "epoch",
    "data_position",
    "seed",
    "rng",
    "params",
    "optim",
    "config",
    "world_size",
)


class CheckpointWarning(UserWarning):
    """A checkpoint file was skipped because it does not load."""


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, mode: str, write: Any) -> None:
    """Write through ``write(file)`` so that readers see the old file or the new one, never
    half; a failed write (a full disk) removes its temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename)."""
    _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, "w", lambda f: f.write(text))


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used: ``key`` is its path."""

    def __init__(self, path: str | Path, message: str) -> None:
        ValueError.__init__(self, f"checkpoint {path} {message}")
        self.key, self.message = str(path), message


def load(path: str | Path) -> dict[str, Any]:
    """Load and check one checkpoint file.

    :raises CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (a save was interrupted?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False, i.e. running the file's code: never.
        if not _is_zip(path):
            what = "is not a torch checkpoint file (damaged, or another format)"
        elif "Weights only load failed" in str(e):
            what = (
                "is not a distsvi checkpoint: it holds Python objects other than tensors and "
                "plain containers, which are never loaded"
            )
        elif "truncated" in str(e) or "EOF" in str(e):
            what = "is truncated (a save was interrupted?)"
        else:
            what = "is not a torch checkpoint file (damaged, or another format)"
        raise CheckpointError(path, what) from None
    except (PermissionError, IsADirectoryError) as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        # A torch file is a zip archive: a cut one fails to seek or lacks its directory.
        raise CheckpointError(
            path,
            f"is truncated or damaged: not a complete torch file ({type(e).__name__}: "
            f"{_without_advice(first_line(e))})",
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
        raise CheckpointError(path, f"does not load ({type(e).__name__})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(path, f"is not a distsvi checkpoint (it lacks {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise CheckpointError(
            path, f"has format {state['format']}, this version of distsvi reads {FORMAT}"
        )
    return state


def _is_zip(path: Path) -> bool:
    """torch.save writes a zip archive; a file that does not start as one is not a torch file."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _without_advice(text: str) -> str:
    """torch's error text, cut before any advice to load with ``weights_only=False``."""
    cut = text.find("weights_only")
    return text[:cut].rstrip(" .,;:(") if cut >= 0 else text


class Checkpointer:
    """Saves every ``every`` steps and at the end, keeps the newest ``keep``, finds the newest good one.

    :param directory: where ``step_*.pt`` files live.
    :param every: save period in steps (0: only at the end).
    :param keep: how many of the newest files to keep.
    :param is_writer: only the main rank writes; the others call :meth:`save` harmlessly.
    """

    def __init__(self, directory: str | Path, every: int, keep: int, is_writer: bool) -> None:
        self.dir, self.every, self.keep, self.is_writer = Path(directory), every, keep, is_writer

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` atomically, then drop files beyond the newest ``keep``."""
        if not self.is_writer:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(state["step"])
        try:
            save_atomic(state, path)
        except Exception as e:
            # A full disk or a quota: the run cannot keep its progress. torch.save may
            # report it as its zip writer's RuntimeError, raised while handling the OSError.
            os_error = e if isinstance(e, OSError) else e.__context__
            if not isinstance(os_error, OSError):
                raise
            e = os_error
            raise RunFailed(
                f"cannot write checkpoint {path} ({e.strerror or e}); free space in "
                f"{self.dir} or set checkpoint.dir to another directory, then run again "
                "(it resumes from the newest checkpoint)"
            ) from None
        for old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; each one that does not is skipped with a warning."""
        for path in self.files():
            try:
                return load(path), path
            except CheckpointError as e:
                warnings.warn(
                    f"skipping bad checkpoint {path}: {e}", CheckpointWarning, stacklevel=2
                )
        return None

    def remove_stale_tmp(self) -> None:
        """Remove temporary files that a writer killed mid-save left behind."""
        if self.is_writer and self.dir.is_dir():
            for tmp in self.dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


# -- a job's state -------------------------------------------------------------------


def _rng_states(group: distributed.ProcessGroup) -> dict[str, torch.Tensor]:
    """Every rank's generator states, stacked by rank (a collective when distributed)."""
    states = {"torch": torch.get_rng_state()}
    if group.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(group.device)
    if not group.is_distributed:
        return {k: v.unsqueeze(0) for k, v in states.items()}
    gathered: list[dict | None] = [None] * group.world_size
    torch_dist.all_gather_object(gathered, states)
    return {k: torch.stack([g[k] for g in gathered]) for k in states}


def job_state(job: Job, step: int) -> dict[str, Any]:
    store = distsvi.get_param_store().state_dict()
    buffers = {}
    if isinstance(job.model_obj, torch.nn.Module):
        buffers = {k: v.detach().cpu() for k, v in job.model_obj.named_buffers()}
    return {
        "format": FORMAT,
        "step": step,
        "epoch": job.current_epoch(step),
        "data_position": job.data_state(),
        "seed": job.cfg.run.seed,
        "rng": _rng_states(job.group),
        "params": {k: v.cpu() for k, v in store["params"].items()},
        "constraints": store["constraints"],
        "buffers": buffers,
        "optim": job.optim.get_state(),
        "skipped_steps": job.monitor.skipped,
        "config": to_yaml(job.cfg),
        "world_size": job.group.world_size,
    }


def _materialize_params(job: Job) -> None:
    """Run model and guide once so that every param (and module) exists, off the RNG stream."""
    with torch.random.fork_rng(devices=cuda_devices(job.group)), torch.no_grad():
        job.svi.loss(
            job.model,
            job.guide,
            *job.split.train,
            size=job.split.num_train,
            subsample_size=job.cfg.run.batch_size,
        )


def load_params(job: Job, state: dict[str, Any], path: Path) -> None:
    """Copy a checkpoint's params and buffers into the store (in place, so modules see them).

    :raises CheckpointError: when a param's shape does not fit this config's model.
    """
    _materialize_params(job)
    store = distsvi.get_param_store()
    unconstrained = dict(store.named_parameters())
    for name, value in state["params"].items():
        own = unconstrained.get(name)
        if own is not None and own.shape != value.shape:
            raise CheckpointError(
                path,
                f"does not fit this config: param {name!r} is {tuple(value.shape)} in the "
                f"checkpoint and {tuple(own.shape)} here (another model or data?); start "
                "afresh with checkpoint.resume=never or a new checkpoint.dir",
            )
    missing = {}
    with torch.no_grad():
        for name, value in state["params"].items():
            if name in unconstrained:
                unconstrained[name].copy_(value)
            else:
                missing[name] = value
        if missing:
            store.set_state(
                {"params": missing, "constraints": {k: state["constraints"][k] for k in missing}}
            )
        if isinstance(job.model_obj, torch.nn.Module):
            own = dict(job.model_obj.named_buffers())
            for name, value in state["buffers"].items():
                own[name].copy_(value)


def read_checkpoint(job: Job, ckpt: Checkpointer | None, resume: str) -> tuple[dict, Path] | None:
    """Rank 0 picks and reads the checkpoint (``auto``: the newest in ``ckpt`` that loads;
    or the path ``resume``) and sends it to the others, so every rank resumes from the same
    one and nodes need no shared file system to read it."""
    found: Any = None
    if job.group.is_main and resume != "never":
        try:
            found = ckpt.latest() if resume == "auto" else (load(resume), Path(resume))
        except CheckpointError as e:
            found = e  # every rank raises it, none waits for the others
    if job.group.is_distributed:
        box = [found]
        torch_dist.broadcast_object_list(box, src=0)
        found = box[0]
    if isinstance(found, CheckpointError):
        raise CheckpointError(found.key, found.message)
    return found


def restore(job: Job, ckpt: Checkpointer) -> int:
    """Resume per ``checkpoint.resume``: set params, optimizer, data position and RNG;
    return the number of steps already done (0 for a fresh start)."""
    cfg, group = job.cfg, job.group
    found = read_checkpoint(job, ckpt, cfg.checkpoint.resume)
    if found is None:
        return 0
    state, path = found
    changed = compare_configs(state, path, cfg, group.is_main)
    load_params(job, state, path)
    optim_state = state["optim"]
    if any(k.startswith("optim.") for k in changed):
        optim_state = _without_hyperparameters(optim_state)
    job.optim.set_state(optim_state)
    job.load_data_state(state["data_position"])
    job.monitor.skipped = int(state["skipped_steps"])
    if state["world_size"] == group.world_size:
        # clone: a tensor unpickled from a broadcast may not own its memory
        torch.set_rng_state(state["rng"]["torch"][group.rank].clone())
        if "cuda" in state["rng"] and group.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"][group.rank].clone(), group.device)
    else:
        if group.is_main:
            warnings.warn(
                f"{path} was written by {state['world_size']} ranks, this job has "
                f"{group.world_size}: the random streams restart from the seed, so the run "
                "will not repeat the original exactly",
                stacklevel=2,
            )
        distsvi.set_rng_seed(rank_seed(cfg.run.seed + int(state["step"]), group.rank))
    if group.is_main:
        print(f"resuming from {path} at step {state['step']}", flush=True)
    return int(state["step"])


def compare_configs(
    state: dict[str, Any], path: Path, cfg: TrainConfig, announce: bool
) -> list[str]:
    """Compare the checkpoint's resolved config with this job's.

    :returns: the dotted keys that changed safely (they take effect; announced in one line).
    :raises CheckpointError: when a key that makes the checkpoint inapplicable changed.
    """
    try:
        saved = from_yaml(state["config"])
    except Exception:  # noqa: BLE001 - a config this version cannot read: compare nothing
        return []
    unsafe, safe = diff_configs(saved, cfg)
    if unsafe:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in unsafe)
        raise CheckpointError(
            path,
            f"was trained with another config ({shown}), so it cannot be resumed; start "
            "afresh with checkpoint.resume=never, or give this job a new checkpoint.dir",
        )
    if safe and announce:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in safe)
        print(f"resuming with changed settings: {shown}", flush=True)
    return [k for k, _, _ in safe]


def _without_hyperparameters(optim_state: dict[str, Any]) -> dict[str, Any]:
    """Optimizer state whose saved hyper-parameters (lr, betas, ...) give way to the
    config's: moments and step counts are kept."""
    return without_hyperparameters(optim_state)

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
``local``     local params (one row per datapoint): ``{name: {"dim", "size",
              "optim": {state key: its row dim}}}``; their rows are not in this
              file but in the directory ``step_00000100.rows`` beside it
============  ==============================================================

Local params (AutoNormal's per-datapoint locals, say) may be sharded: rank r holds only its
block of their rows. Their values and row-shaped optimizer state go to ``step_*.rows``,
written by every rank at once with ``torch.distributed.checkpoint`` (each rank writes its
own rows; nothing is gathered), and read back the same way into whatever blocks the
resuming job holds, so a checkpoint of 2 ranks resumes on 1 and one of 1 on 2 (DCP reads
the saved chunks that overlap each rank's block). The directory is complete before the
``.pt`` file that names it is renamed into place: the ``.pt`` file is the commit.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

import distsvi
from distsvi import distributed
from distsvi.distributed.data import rank_seed
from distsvi.optim.optim import without_hyperparameters
from distsvi.params import rows as _rows
from distsvi.train.config import TrainConfig, diff_configs, from_yaml, to_yaml
from distsvi.train.errors import ConfigError, RunFailed, first_line
from distsvi.train.job import Job

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
    if not _is_zip(path):  # distsvi writes torch's zip format, never anything else
        raise CheckpointError(path, "is not a torch checkpoint file (damaged, or another format)")
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
        if not _is_zip(path):
            raise CheckpointError(
                path, "is not a torch checkpoint file (damaged, or another format)"
            ) from None
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
    if state.get("local") and not (rows_dir(path) / ".metadata").is_file():
        raise CheckpointError(
            path,
            f"keeps its local params' rows in {rows_dir(path)}, which is missing or "
            "incomplete (the rows are written by every rank to checkpoint.dir: on several "
            "nodes it must be a shared file system)",
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
            shutil.rmtree(rows_dir(old), ignore_errors=True)
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
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
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
    """Everything a checkpoint file holds (a collective when distributed); the rows of
    local params are left out and written by :func:`save_rows`."""
    store = distsvi.get_param_store().state_dict()
    local = local_rows(job)
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
        "params": {k: v.cpu() for k, v in store["params"].items() if k not in local},
        "constraints": store["constraints"],
        "buffers": buffers,
        "optim": job.optim.get_state({n: set(info["optim"]) for n, info in local.items()}),
        "local": local,
        "skipped_steps": job.monitor.skipped,
        "config": to_yaml(job.cfg),
        "world_size": job.group.world_size,
    }


def _materialize_params(job: Job) -> None:
    """Run model and guide once so that every param (and module) exists, off the RNG stream."""
    with job.probing() as (args, kwargs):
        job.svi.loss(job.model, job.guide, *args, **kwargs)


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
    if state.get("local"):
        load_rows(job, state, path)


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
    optim_state = {**state["optim"], **state.get("local_optim", {})}
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


# -- local params' rows ------------------------------------------------------------------


def rows_dir(path: Path) -> Path:
    """The directory of local params' rows that goes with checkpoint file ``path``."""
    return path.with_suffix(".rows")


def local_rows(job: Job) -> dict[str, dict[str, Any]]:
    """This job's local params and which of their optimizer state is row-shaped:
    ``{name: {"dim": row dim, "size": rows in all, "optim": {state key: row dim}}}``."""
    store = dict(distsvi.get_param_store().named_parameters())
    out = {}
    for name, (dim, size, start, stop) in sorted(_rows.local_layout().items()):
        p = store.get(name)
        if p is None or p.shape[dim] != stop - start:
            continue
        keys = {}
        for key, v in job.optim.live_state(name).items():
            if not torch.is_tensor(v) or v.dim() == 0:
                continue
            if v.shape == p.shape:
                keys[key] = dim
            elif key == "step" and v.shape == (stop - start,):
                keys[key] = 0  # lazy updates: one step count per row
        out[name] = {"dim": dim, "size": size, "optim": keys}
    return out


def _global(t: torch.Tensor, dim: int, size: int, start: int, group: Any) -> Any:
    """``t``, rows ``[start, start + len)`` along ``dim`` of a tensor of ``size`` rows, as
    DCP sees it: the tensor itself when it holds every row, else a ShardedTensor whose
    shards are every rank's block (sizes differing by at most one, as the data's)."""
    if t.shape[dim] == size:
        return t
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    device = "cpu" if t.device.type == "cpu" else f"{t.device.type}:{t.device.index or 0}"
    shards, mine = [], None
    for rank in range(group.world_size):
        rows = distributed.shard_indices(size, rank, group.world_size)
        offsets = [0] * t.dim()
        offsets[dim] = int(rows[0]) if len(rows) else 0
        sizes = list(t.shape)
        sizes[dim] = len(rows)
        md = ShardMetadata(offsets, sizes, f"rank:{rank}/{device}")
        shards.append(md)
        if rank == group.rank:
            mine = md
    if mine.shard_offsets[dim] != start or mine.shard_sizes[dim] != t.shape[dim]:
        raise RuntimeError(f"rows {start}.. of {size} are not this rank's block")
    global_shape = list(t.shape)
    global_shape[dim] = size
    meta = ShardedTensorMetadata(
        shards, torch.Size(global_shape), TensorProperties(dtype=t.dtype)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ShardedTensor: still DCP's reshard
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            [Shard(t, mine)], meta
        )


def _row_tensors(job: Job, local: dict, make: Any) -> dict[str, Any]:
    """The DCP state dict of this rank's rows: ``make(name, key, like, dim)`` gives the
    tensor of each entry (``key`` None for the param itself)."""
    store = dict(distsvi.get_param_store().named_parameters())
    layout = _rows.local_layout()
    out = {}
    for name, info in local.items():
        p = store[name]
        dim, size, start, _ = layout[name]
        out[f"param/{name}"] = _global(make(name, None, p), dim, size, start, job.group)
        for key, kdim in info["optim"].items():
            # row-shaped state is shaped like the param, or one count per row (kdim 0)
            shape = p.shape if kdim == dim and key != "step" or p.dim() == 1 else (p.shape[dim],)
            out[f"optim/{name}/{key}"] = _global(
                make(name, key, p, shape), kdim, size, start, job.group
            )
    return out


def _dcp_quietly() -> Any:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    return ctx


def save(job: Job, ckpt: Checkpointer, step: int) -> None:
    """Write the checkpoint of ``step`` (every rank calls it): the rows of local params
    first, by every rank, then the file that commits them, by the main rank."""
    state = job_state(job, step)
    save_rows(job, ckpt, step)
    ckpt.save(state)


def save_rows(job: Job, ckpt: Checkpointer, step: int) -> None:
    """Write this rank's rows of local params for the checkpoint of ``step`` (every rank
    calls it together, before the checkpoint file is written)."""
    local = local_rows(job)
    if not local:
        return
    import torch.distributed.checkpoint as dcp

    final = rows_dir(ckpt.path(step))
    tmp = final.with_name(f".{final.name}.tmp")

    def live(name: str, key: str | None, p: torch.Tensor, shape: Any = None) -> torch.Tensor:
        return p.detach() if key is None else job.optim.live_state(name)[key]

    tensors = _row_tensors(job, local, live)
    quiet = _dcp_quietly()
    try:
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not job.group.is_distributed)
    except Exception as e:  # noqa: BLE001 - DCP reports every rank's failure the same way
        if ckpt.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(
            f"cannot write the local params' rows of checkpoint step {step} to {tmp} "
            f"({first_line(e)}); free space in {ckpt.dir} or set checkpoint.dir to another "
            "directory, then run again (it resumes from the newest checkpoint)"
        ) from None
    finally:
        quiet.__exit__(None, None, None)
    # DCP returns on every rank once the coordinator has written the metadata: complete.
    if ckpt.is_writer:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)


def load_rows(job: Job, state: dict[str, Any], path: Path) -> None:
    """Read the rows of local params this rank holds from the checkpoint's rows directory
    (every rank together), into the store in place; their optimizer state goes to
    ``state["local_optim"]`` for :func:`restore` to hand to the optimizer."""
    import torch.distributed.checkpoint as dcp

    directory = rows_dir(path)
    local = state["local"]
    layout = _rows.local_layout()
    store = dict(distsvi.get_param_store().named_parameters())
    for name, info in local.items():
        if name not in store or name not in layout or layout[name][1] != info["size"]:
            have = "absent" if name not in layout else f"of {layout[name][1]} rows"
            raise CheckpointError(
                path,
                f"does not fit this config: local param {name!r} has {info['size']} rows in "
                f"the checkpoint and is {have} here (another model or data?); start afresh "
                "with checkpoint.resume=never or a new checkpoint.dir",
            )
    targets: dict[tuple, torch.Tensor] = {}

    def fresh(name: str, key: str | None, p: torch.Tensor, shape: Any = None) -> torch.Tensor:
        if key is None:
            t = p.detach()  # the store's leaf: loaded in place
        else:
            dtype = torch.float32 if key == "step" else p.dtype  # lazy steps count in float32
            t = torch.zeros(shape, dtype=dtype, device=p.device)
        targets[(name, key)] = t
        return t

    tensors = _row_tensors(job, local, fresh)
    quiet = _dcp_quietly()
    try:
        with torch.no_grad():
            dcp.load(tensors, checkpoint_id=directory, no_dist=not job.group.is_distributed)
    except Exception as e:  # noqa: BLE001 - DCP reports every rank's failure the same way
        raise CheckpointError(
            path, f"cannot read its local params' rows from {directory} ({first_line(e)})"
        ) from None
    finally:
        quiet.__exit__(None, None, None)
    entries: dict[str, Any] = {}
    for name, info in local.items():
        if not info["optim"]:
            continue
        entry = state["optim"].get(name)
        if entry is None:
            continue
        scheduled = "scheduler" in entry and "optimizer" in entry
        inner = entry["optimizer"] if scheduled else entry
        saved = dict(inner["state"].get(0, {}))
        for key in info["optim"]:
            saved[key] = targets[(name, key)]
        inner = {**inner, "state": {0: saved}}
        entries[name] = {**entry, "optimizer": inner} if scheduled else inner
    state["local_optim"] = entries

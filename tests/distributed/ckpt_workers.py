"""What each rank runs in the sharded-checkpoint tests (module level, so spawn can pickle it):
the job on the built-in conjugate model, with per-datapoint AutoNormal locals."""

from __future__ import annotations

from typing import Any

import torch

import distsvi
from distsvi.params import rows
from distsvi.train import checkpoint, evaluate, load_config, train
from distsvi.train.data import load_data
from distsvi.train.job import build_job

# 1800 training rows (900 per rank), a latent in R^3 per row, 56 steps to an epoch per rank.
BASE = [
    "data.options.num_points=2000",
    "data.options.latent_dim=3",
    "run.batch_size=16",
    "run.log_every=100",
    "run.val_every=1000",
    "run.progress=none",
    "checkpoint.every=100",
    "checkpoint.keep=5",
]


def overrides(root: str, steps: int, *extra: str) -> list[str]:
    return [*BASE, f"run.steps={steps}", f"checkpoint.dir={root}/ck", f"log.dir={root}/tb", *extra]


def store_rows() -> dict[str, Any]:
    """Every param's unconstrained value on this process, with the rows it stores."""
    layout = rows.local_layout()
    return {
        name: {"value": p.detach().clone(), "rows": layout.get(name)}
        for name, p in distsvi.get_param_store().named_parameters()
    }


def train_rank(group, args: list[str]) -> dict[str, Any]:
    """Run the job on this rank; its params (this rank's rows of the locals) afterwards."""
    results = train(load_config("local_normal", args))
    return {"params": store_rows(), "results": results}


def restore_rank(group, args: list[str]) -> dict[str, Any]:
    """Build the job and resume it from its newest checkpoint, training nothing: what was
    loaded (params and the optimizer state of the locals)."""
    cfg = load_config("local_normal", args)
    job = build_job(cfg, group)
    ckpt = checkpoint.Checkpointer(
        cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep, group.is_main
    )
    step = checkpoint.restore(job, ckpt)
    params = store_rows()
    state = job.optim.get_state()  # loaded, waiting for the params' first step
    optim = {
        name: {k: v for k, v in state[name]["state"][0].items() if torch.is_tensor(v)}
        for name, entry in params.items()
        if entry["rows"] is not None
    }
    return {"step": step, "params": params, "optim": optim}


def eval_rank(group, args: list[str], path: str) -> float | None:
    return evaluate(load_config("local_normal", args), path)


def block_rank(group, args: list[str], steps: int) -> dict[str, Any]:
    """The job's training rows on this rank, and its first steps; then the same steps
    with the whole table in memory and the plate drawing the same rows from it."""
    cfg = load_config("local_normal", args)
    out: dict[str, Any] = {}
    for kind in ("block", "whole"):
        job = build_job(cfg, group)
        if kind == "whole":  # the table as loaded, the "data" plate indexing it
            job.split = load_data(cfg.data)
        out[kind] = {
            "rows": job.split.train[0].shape[0],
            "offset": job.split.offset,
            "num_train": job.split.num_train,
        }
        # params and the guide's prototype made first, from one seed (as on resume)
        distsvi.set_rng_seed(5)
        checkpoint._materialize_params(job)
        distsvi.set_rng_seed(11 + group.rank)
        out[kind]["losses"] = [job.step() for _ in range(steps)]
        out[kind]["params"] = store_rows()
    return out

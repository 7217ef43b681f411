"""What each rank runs in the shared-memory averaging tests (module level, for spawn)."""

from __future__ import annotations

import os

import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributed import DataParallelSVI, ProcessGroup, seed_rank, shm
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam

_NET: torch.nn.Module | None = None


def _mlp_model(x, y, batch=None):
    net = pyro.module("net", _NET)
    with pyro.plate("data", y.shape[0], subsample_size=batch) as i:
        pyro.sample("obs", dist.Normal(net(x[i]).squeeze(-1), 1.0), obs=y[i])


def _empty_guide(x, y, batch=None):
    pass


def _train(group: ProcessGroup, width: int, steps: int, list_dir: bool = True, **dp_kwargs) -> dict:
    """An MLP regression (two hidden layers of ``width``) trained ``steps`` steps."""
    global _NET
    pyro.clear_param_store()
    torch.manual_seed(0)  # the same initial net on every rank and in every run
    _NET = torch.nn.Sequential(
        torch.nn.Linear(8, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )
    init = {k: v.detach().clone() for k, v in _NET.state_dict().items()}
    seed_rank(0, group)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 8, generator=gen), torch.randn(512, generator=gen)
    dp = DataParallelSVI(
        SVI(_mlp_model, _empty_guide, Adam({"lr": 0.01}), Trace_ELBO()), group, **dp_kwargs
    )
    losses, listed = [], None
    for _ in range(steps):
        losses.append(dp.step(x, y, batch=32))
        if listed is None and list_dir:
            listed = sorted(os.listdir(shm.SHM_DIR))
    return {
        "params": {k: v.detach().clone() for k, v in _NET.state_dict().items()},
        "init": init,
        "losses": losses,
        "reducer": type(dp._reducer).__name__,
        "left_in_dir": listed,
    }


def shm_vs_gloo(group: ProcessGroup, shm_dir: str, steps: int, spin: bool) -> dict:
    """The same training averaged through shared memory (forced) and by Gloo."""
    shm.SHM_DIR, shm.SPIN_BARRIERS = shm_dir, spin
    return {
        "shm": _train(group, 32, steps, shared_memory=True),
        "gloo": _train(group, 32, steps, shared_memory=False),
    }


def auto_choice(group: ProcessGroup, shm_dir: str, spin: bool) -> dict:
    """Which reducer the default picks for a small net (5.5 KB, gathered by Gloo) and a
    wide one (1.1 MB), with counter or Gloo barriers."""
    shm.SHM_DIR, shm.SPIN_BARRIERS = shm_dir, spin
    return {"small": _train(group, 32, 2)["reducer"], "wide": _train(group, 512, 2)["reducer"]}


def private_dirs(group: ProcessGroup, base: str, steps: int) -> dict:
    """Each rank sees a shared-memory directory of its own, as ranks on two machines do:
    no rank can map another's segment, so all fall back to Gloo, together."""
    shm.SHM_DIR = os.path.join(base, f"rank{group.rank}")
    os.makedirs(shm.SHM_DIR)
    out = _train(group, 32, steps, shared_memory=True)
    out["reference"] = _train(group, 32, steps, shared_memory=False)
    return out


def rank_1_fails(group: ProcessGroup, shm_dir: str) -> dict:
    """Rank 1 raises at its fourth step, between two shared-memory steps."""
    shm.SHM_DIR = shm_dir
    if group.rank == 1:
        import distsvi.infer.svi as svi_module

        real, calls = svi_module.SVI._apply, {"n": 0}

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:
                raise ValueError("the user's model failed on rank 1")
            return real(self, *args, **kwargs)

        svi_module.SVI._apply = failing
    return _train(group, 32, 10, shared_memory=True)


def no_shm_dir(group: ProcessGroup, missing: str) -> dict:
    """No shared-memory directory at all (another OS, a container without one): a forced
    ``shared_memory=True`` falls back to Gloo on every rank and says why."""
    import logging

    shm.SHM_DIR = missing
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("distsvi.distributed.shm")
    log.addHandler(handler)
    try:
        out = _train(group, 32, 3, shared_memory=True, list_dir=False)
    finally:
        log.removeHandler(handler)
    out["said"] = said
    return out

"""What each rank runs in the local-params tests (module level, so spawn can pickle it)."""

from __future__ import annotations

import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributed import DataParallelSVI, ProcessGroup, seed_rank, shard_indices
from distsvi.infer import SVI, Trace_ELBO
from distsvi.infer.autoguide import AutoDelta
from distsvi.optim import Adam

D = 3


def data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, D, generator=g, dtype=torch.float64).to(torch.get_default_dtype()) + 1


def local_model(x, idx=None, batch=None):
    n = len(x)
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 3.0).to_event(1))
    with pyro.plate("data", n, subsample=idx, subsample_size=batch) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x[i])


def init_fixed(site: dict) -> torch.Tensor:
    return torch.full(site["fn"].batch_shape + site["fn"].event_shape, 0.2)


def guide() -> AutoDelta:
    return AutoDelta(local_model, init_loc_fn=init_fixed)


def batches(n: int, world: int, batch: int, steps: int) -> list[list[torch.Tensor]]:
    """For each step, each rank's batch: ``batch`` rows of the rank's own contiguous block."""
    out = []
    for t in range(steps):
        per_rank = []
        for r in range(world):
            block = shard_indices(n, r, world)
            g = torch.Generator().manual_seed(1000 * t + r)
            per_rank.append(block[torch.randperm(len(block), generator=g)[:batch]])
        out.append(per_rank)
    return out


def snapshot() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def given_batches(
    group: ProcessGroup, n: int, batch: int, steps: int, local_params: str, local_updates: str
) -> dict:
    seed_rank(0, group)
    x = data(n)
    svi = SVI(local_model, guide(), Adam({"lr": 0.05}, local_updates=local_updates), Trace_ELBO())
    dp = DataParallelSVI(svi, group, local_params=local_params)
    losses = [dp.step(x, idx=b[group.rank]) for b in batches(n, group.world_size, batch, steps)]
    return {
        "params": snapshot(),
        "losses": losses,
        "allreduce_bytes": dp.allreduce_bytes,
        "val": dp.evaluate_loss(x),
    }


def drawn_batches(group: ProcessGroup, n: int, batch: int, steps: int, local_updates: str) -> dict:
    seed_rank(0, group)
    x = data(n)
    svi = SVI(local_model, guide(), Adam({"lr": 0.05}, local_updates=local_updates), Trace_ELBO())
    dp = DataParallelSVI(svi, group, local_params="sharded", seed=7)
    drawn = []
    for _ in range(steps):
        dp.step(x, batch=batch)
        drawn.append(dp.shards.indices("data").clone())
    return {"params": snapshot(), "indices": drawn}


def vectorized_unbounded(group: ProcessGroup, n: int, batch: int) -> dict:
    """Vectorized particles with no max_plate_nesting: the ELBO's trial run that finds the
    nesting runs under the rank's shard, so it creates only the rank's rows too."""
    seed_rank(0, group)
    x = data(n)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True)
    svi = SVI(local_model, guide(), Adam({"lr": 0.05}, local_updates="lazy"), loss)
    dp = DataParallelSVI(svi, group, local_params="sharded", seed=7)
    losses = [dp.step(x, batch=batch) for _ in range(3)]
    return {
        "shapes": {k: tuple(v.shape) for k, v in snapshot().items()},
        "losses": losses,
        "nesting": loss.max_plate_nesting,
    }

"""What each rank runs in the data-parallel tests (module level, so spawn can pickle it)."""

from __future__ import annotations

import dp_models as m
import torch
import torch.distributed

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributed import (
    DataParallelSVI,
    ProcessGroup,
    seed_rank,
)
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from distsvi.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from distsvi.optim import SGD, Adam

MODELS = {
    "logistic": (m.make_logistic, m.logistic_model),
    "hierarchical": (m.make_hierarchical, m.hierarchical_model),
}


def init_fixed(site: dict) -> torch.Tensor:
    """Every latent starts at 0.2: a single-process reference then starts where rank 0
    does (init_to_median draws, and the reference draws no subsample before it)."""
    return torch.full(site["fn"].batch_shape + site["fn"].event_shape, 0.2)


def auto_delta(model):
    return AutoDelta(model, init_loc_fn=init_fixed)


def snapshot() -> dict[str, torch.Tensor]:
    """Every param's unconstrained value."""
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def equivalence(group: ProcessGroup, name: str, steps: int, batch: int) -> dict:
    seed_rank(0, group)
    make, model = MODELS[name]
    x, y = make()
    dp = DataParallelSVI(
        SVI(model, auto_delta(model), Adam({"lr": 0.05}), Trace_ELBO()), group, seed=3
    )
    indices = []
    for _ in range(steps):
        dp.step(x, y, batch=batch)
        indices.append(dp.shards.indices("data").clone())
    return {"indices": indices, "params": snapshot()}


def losses_at_fixed_params(group: ProcessGroup, steps: int, batch: int) -> list[float]:
    seed_rank(0, group)
    x, y = m.make_logistic()
    svi = SVI(m.logistic_model, m.logistic_delta_guide, SGD({"lr": 0.0}), Trace_ELBO())
    dp = DataParallelSVI(svi, group, seed=5)
    return [dp.step(x, y, batch=batch) for _ in range(steps)]


def identical_state(group: ProcessGroup, steps: int) -> dict:
    seed_rank(0, group)
    noise = torch.randn(3)  # differs per rank: Monte-Carlo noise is per rank
    seed_rank(0, group)
    x, y = m.make_hierarchical()
    optim = Adam({"lr": 0.05})
    guide = AutoNormal(m.hierarchical_model)  # a global and a per-datapoint latent
    dp = DataParallelSVI(SVI(m.hierarchical_model, guide, optim, Trace_ELBO()), group)
    losses = [dp.step(x, y, batch=32) for _ in range(steps)]
    return {"params": snapshot(), "optim": optim.get_state(), "noise": noise, "losses": losses}


def bernoulli_model(x, y, batch=None, idx=None):
    p = pyro.sample("p", dist.Beta(torch.tensor(2.0), 2.0))
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        c = pyro.sample("c", dist.Bernoulli(p))
        pyro.sample("obs", dist.Normal(2.0 * c, 1.0), obs=y[i])


def bernoulli_guide(x, y, batch=None, idx=None):
    a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
    b = pyro.param("b", torch.tensor(2.0), constraint=constraints.positive)
    probs = pyro.param(
        "probs", torch.full((y.shape[0],), 0.5), constraint=constraints.unit_interval
    )
    pyro.sample("p", dist.Beta(a, b))
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
        pyro.sample("c", dist.Bernoulli(probs[i]), infer={"baseline": baseline})


def every_loss(group: ProcessGroup, steps: int) -> dict:
    out = {}
    runs = {  # AutoDiagonalNormal takes global latents only
        "Trace_ELBO": (m.make_logistic, m.logistic_model, AutoDiagonalNormal, Trace_ELBO),
        "TraceMeanField_ELBO": (
            m.make_hierarchical,
            m.hierarchical_model,
            AutoNormal,
            TraceMeanField_ELBO,
        ),
        "TraceGraph_ELBO": (m.make_hierarchical, bernoulli_model, None, TraceGraph_ELBO),
    }
    for name, (make, model, auto, loss) in runs.items():
        pyro.clear_param_store()
        seed_rank(0, group)
        x, y = make()
        guide = bernoulli_guide if auto is None else auto(model)
        dp = DataParallelSVI(SVI(model, guide, Adam({"lr": 0.05}), loss()), group)
        losses = [dp.step(x, y, batch=16) for _ in range(steps)]
        out[name] = {"losses": losses, "params": snapshot()}
    return out

"""What each rank runs in the data-parallel tests (module level, so spawn can pickle it)."""

from __future__ import annotations

import contextlib
import math

import dp_models as m
import torch
import torch.distributed
from torch.utils.data import TensorDataset

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributed import (
    DataParallelSVI,
    DistributedLoader,
    ProcessGroup,
    seed_rank,
)
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from distsvi.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
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


def identical_state(group: ProcessGroup, steps: int, busy_wait_ms: float = 20.0) -> dict:
    seed_rank(0, group)
    noise = torch.randn(3)  # differs per rank: Monte-Carlo noise is per rank
    seed_rank(0, group)
    x, y = m.make_hierarchical()
    optim = Adam({"lr": 0.05})
    guide = AutoNormal(m.hierarchical_model)  # a global and a per-datapoint latent
    dp = DataParallelSVI(
        SVI(m.hierarchical_model, guide, optim, Trace_ELBO()), group, busy_wait_ms=busy_wait_ms
    )
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
        guide = bernoulli_guide if auto is None else auto(model)
        out[name] = fresh_run(group, make, model, guide, loss(), steps, batch=16)[0]
    return out


def fresh_run(group, make, model, guide, loss, steps, batch, **svi_kwargs):
    """``steps`` data-parallel Adam steps from an empty param store and rank-0 seed:
    ``({"losses", "params"}, the DataParallelSVI, the data)``."""
    pyro.clear_param_store()
    seed_rank(0, group)
    x, y = make()
    dp = DataParallelSVI(SVI(model, guide, Adam({"lr": 0.05}), loss, **svi_kwargs), group)
    losses = [dp.step(x, y, batch=batch) for _ in range(steps)]
    return {"losses": losses, "params": snapshot()}, dp, (x, y)


AUTOGUIDES = {
    "AutoDelta": AutoDelta,
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": lambda model: AutoLowRankMultivariateNormal(model, rank=2),
}


def every_autoguide(group: ProcessGroup, steps: int) -> dict:
    """Each autoguide on the logistic model (global latents: every guide takes them)."""
    out = {}
    for name, make_guide in AUTOGUIDES.items():
        guide = make_guide(m.logistic_model)
        run, dp, data = fresh_run(
            group, m.make_logistic, m.logistic_model, guide, Trace_ELBO(), steps, batch=32
        )
        out[name] = {**run, "full": dp.evaluate_loss(*data)}
    return out


def rank_dependent_init(x, y, batch=None, idx=None):
    rank = torch.distributed.get_rank()
    w = pyro.param("w_loc", torch.full((x.shape[1],), float(rank + 1)))
    b = pyro.param("b_loc", torch.tensor(-float(rank + 1)))
    pyro.sample("w", dist.Delta(w).to_event(1))
    pyro.sample("b", dist.Delta(b))


def lazy_broadcast(group: ProcessGroup) -> dict:
    seed_rank(0, group)
    x, y = m.make_logistic()
    dp = DataParallelSVI(
        SVI(m.logistic_model, rank_dependent_init, SGD({"lr": 0.0}), Trace_ELBO()), group
    )
    dp.step(x, y, batch=16)
    after_one = snapshot()
    pyro.clear_param_store()
    optim = Adam({"lr": 0.1})
    dp = DataParallelSVI(SVI(m.logistic_model, rank_dependent_init, optim, Trace_ELBO()), group)
    for _ in range(5):
        dp.step(x, y, batch=16)
    return {"after_one": after_one, "after_five": snapshot()}


def _extra_param_on_rank_1(from_step: int):
    calls = {"n": 0}

    def guide(x, y, batch=None, idx=None):
        calls["n"] += 1
        m.logistic_delta_guide(x, y, batch, idx)
        if torch.distributed.get_rank() == 1 and calls["n"] > from_step:
            pyro.param("only_on_rank_1", torch.zeros(2))

    return guide


def mismatched_params(group: ProcessGroup, from_step: int) -> None:
    seed_rank(0, group)
    x, y = m.make_logistic()
    guide = _extra_param_on_rank_1(from_step)
    dp = DataParallelSVI(SVI(m.logistic_model, guide, Adam({"lr": 0.1}), Trace_ELBO()), group)
    for _ in range(6):
        dp.step(x, y, batch=16)


def nan_on_rank_1(
    group: ProcessGroup, bad_steps: set[int], max_bad_steps: int, shared_memory=None
) -> dict:
    seed_rank(0, group)
    x, y = m.make_logistic()
    step = {"n": 0}

    def guide(x, y, batch=None, idx=None):
        w = pyro.param("w_loc", torch.zeros(x.shape[1]))
        b = pyro.param("b_loc", torch.tensor(0.0))
        if torch.distributed.get_rank() == 1 and step["n"] in bad_steps:
            w = w * 1.0  # a finite loss, but a NaN gradient on rank 1 only
            w.register_hook(lambda g: torch.full_like(g, math.nan))
        pyro.sample("w", dist.Delta(w).to_event(1))
        pyro.sample("b", dist.Delta(b))

    dp = DataParallelSVI(
        SVI(m.logistic_model, guide, Adam({"lr": 0.1}), Trace_ELBO()),
        group,
        max_bad_steps=max_bad_steps,
        shared_memory=shared_memory,
    )
    history = []
    for n in range(1, 11):
        step["n"] = n
        dp.step(x, y, batch=16)
        history.append(snapshot())
    return {
        "history": history,
        "num_skipped": dp.num_skipped,
        "reducer": type(dp._reducer).__name__,
    }


def many_params_model(x, y, batch=None, idx=None):
    loc = sum(pyro.param(f"p{i}", torch.full((250,), 0.01 * i)).sum() for i in range(200))
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        pyro.sample("obs", dist.Normal(loc / 1000.0, 1.0), obs=y[i])


def empty_guide(x, y, batch=None, idx=None):
    pass


@contextlib.contextmanager
def _counted_collectives():
    """The names of the gradient collectives called inside the block, in order."""
    tdist = torch.distributed
    names = ("all_reduce", "all_gather_single", "all_gather_into_tensor")
    real = {k: getattr(tdist, k) for k in names if hasattr(tdist, k)}
    used: list[str] = []

    def counting(name, fn):
        def call(*args, **kwargs):
            used.append(name)
            return fn(*args, **kwargs)

        return call

    for k, fn in real.items():
        setattr(tdist, k, counting(k, fn))
    try:
        yield used
    finally:
        for k, fn in real.items():
            setattr(tdist, k, fn)


def count_collectives(group: ProcessGroup, bucket_cap_mb: float) -> dict:
    seed_rank(0, group)
    y = torch.randn(64)
    dp = DataParallelSVI(
        SVI(many_params_model, empty_guide, Adam({"lr": 0.01}), Trace_ELBO()),
        group,
        bucket_cap_mb=bucket_cap_mb,
        shared_memory=False,  # 200 KB: shared memory by default, one pair of barriers
    )
    dp.step(None, y, batch=8)  # creates, checks and broadcasts the params
    # a small bucket on Gloo is gathered and summed rather than all-reduced: count both
    with _counted_collectives() as calls:
        for _ in range(3):
            dp.step(None, y, batch=8)
    return {"calls": calls, "buckets": len(dp._buckets), "params": len(dp._layout)}


def loader_vs_plate(group: ProcessGroup, steps: int, batch: int) -> dict:
    x, y = m.make_logistic(n=1024)
    out = {}
    for path in ("plate", "loader"):
        pyro.clear_param_store()
        seed_rank(0, group)
        dp = DataParallelSVI(
            SVI(m.logistic_model, m.logistic_delta_guide, Adam({"lr": 0.05}), Trace_ELBO()),
            group,
            seed=7,
        )
        if path == "plate":
            for _ in range(steps):
                dp.step(x, y, batch=batch)
        else:
            loader = DistributedLoader(TensorDataset(x, y), batch, group, seed=7)
            done = 0
            while done < steps:
                for idx, _ in loader:
                    dp.step(x, y, idx=idx)
                    done += 1
                    if done == steps:
                        break
        out[path] = dp.evaluate_loss(x, y)
    return out


def validation(group: ProcessGroup) -> dict:
    seed_rank(0, group)
    x, y = m.make_logistic(n=512)
    x_val, y_val = m.make_logistic(n=301, seed=9)  # not a multiple of 2: unequal shards
    dp = DataParallelSVI(
        SVI(m.logistic_model, m.logistic_delta_guide, Adam({"lr": 0.05}), Trace_ELBO()), group
    )
    for _ in range(3):
        dp.step(x, y, batch=16)
    return {
        "state": pyro.get_param_store().get_state(),
        "subsampled": dp.evaluate_loss(x_val, y_val, batch=16),
        "whole": dp.evaluate_loss(x_val, y_val),
    }


def validation_autoguide(group: ProcessGroup) -> dict:
    seed_rank(0, group)
    x, y = m.make_hierarchical(n=301)  # per-datapoint latents: validate on the training set
    model = m.hierarchical_model
    dp = DataParallelSVI(SVI(model, auto_delta(model), Adam({"lr": 0.05}), Trace_ELBO()), group)
    for _ in range(3):
        dp.step(x, y, batch=16)
    return {"state": pyro.get_param_store().get_state(), "loss": dp.evaluate_loss(x, y, batch=16)}


def late_peer(group: ProcessGroup, late_s: float, busy_wait_s: float) -> dict:
    """Rank 1 joins an all-reduce ``late_s`` seconds after rank 0, which polls for
    ``busy_wait_s`` and then blocks; rank 0 reports how long it waited and its CPU time."""
    import time

    from distsvi.distributed.reduce import wait_all

    t = torch.full((1000,), float(group.rank + 1))
    torch.distributed.barrier()
    if group.rank == 1:
        time.sleep(late_s)
    wall, cpu = time.perf_counter(), time.process_time()
    wait_all([torch.distributed.all_reduce(t, async_op=True)], busy_wait_s)
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "value": t.clone(),
    }


def batchnorm_buffers(group: ProcessGroup, steps: int) -> dict:
    """An amortized guide with BatchNorm: its running statistics are buffers, not params,
    and each rank's shard would move them differently."""
    seed_rank(0, group)
    torch.manual_seed(0)  # the same module init on both ranks
    x = torch.randn(256, 3) * torch.tensor([1.0, 5.0, 0.1]) + 2.0
    encoder = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))

    def model(x):
        with pyro.plate("data", x.shape[0], subsample_size=32) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x[idx])

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0], subsample_size=32) as idx:
            loc, log_scale = encoder(x[idx]).unbind(-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()))

    dp = DataParallelSVI(SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO()), group)
    for _ in range(steps):
        dp.step(x)
    return {"buffers": {n: b.clone() for n, b in encoder.named_buffers()}, "params": snapshot()}


def compiled_and_eager(group: ProcessGroup, steps: int) -> dict:
    """The same data-parallel run, eager and with ``SVI(compile=True)``."""
    out = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        run, dp, _ = fresh_run(
            group,
            m.make_logistic,
            m.logistic_model,
            m.logistic_normal_guide,
            Trace_ELBO(),
            steps,
            batch=32,
            compile=compile_,
        )
        out[name] = {**run, "compiled": dp.svi._compiled is not None}
    return out


def mlp_model(x, y, batch=None, idx=None):
    net = pyro.module("net", _NET)
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        pyro.sample("obs", dist.Normal(net(x[i]).squeeze(-1), 1.0), obs=y[i])


_NET = None


def overlapped(group: ProcessGroup, overlap: bool, num_particles: int, steps: int) -> dict:
    """A 4-layer MLP's params (several buckets at a 0.005 MiB cap) after ``steps`` steps."""
    global _NET
    seed_rank(0, group)
    torch.manual_seed(0)
    _NET = torch.nn.Sequential(
        torch.nn.Linear(8, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )
    pyro.clear_param_store()
    seed_rank(0, group)
    x, y = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)), torch.randn(256)
    elbo = Trace_ELBO(num_particles=num_particles)
    dp = DataParallelSVI(
        SVI(mlp_model, empty_guide, Adam({"lr": 0.01}), elbo),
        group,
        bucket_cap_mb=0.005,
        overlap_backward=overlap,
        shared_memory=False,  # Gloo's buckets are what overlap
    )
    early = []
    for _ in range(steps):
        dp.step(x, y, batch=16)
        early.append(dp._reducer.started_in_backward)
    return {
        "params": {k: v.detach().clone() for k, v in _NET.state_dict().items()},
        "buckets": len(dp._buckets),
        "early": early,
        "overlap": dp.overlap_backward,
    }


def gather_vs_all_reduce(group: ProcessGroup) -> dict:
    """Average the same rank-dependent tensors with small buckets gathered (the default
    on Gloo) and with every bucket all-reduced; count which collective each bucket used."""
    from distsvi.distributed import reduce as R

    gen = torch.Generator().manual_seed(100 + group.rank)
    # one big tensor (its own bucket, above the gather limit) and small ones in 4 KB buckets
    tensors = [torch.randn(n, generator=gen) for n in (70_000, 300, 700, 5, 1000, 2)]
    trailer = torch.tensor([float(group.rank + 1), 0.0])
    buckets = R.bucket_indices(tensors, 4096)
    out: dict = {"inputs": [t.clone() for t in tensors], "buckets": buckets}
    for mode, limit in (("gather", R.GATHER_MAX_BYTES), ("all_reduce", 0)):
        old, R.GATHER_MAX_BYTES = R.GATHER_MAX_BYTES, limit
        try:
            with _counted_collectives() as used:
                avg, tr = R.all_reduce_mean([t.clone() for t in tensors], buckets, trailer, group)
        finally:
            R.GATHER_MAX_BYTES = old
        out[mode] = {"avg": [a.clone() for a in avg], "trailer": tr.clone(), "used": used}
    # a non-finite value on the last rank only, in a gathered bucket and in an all-reduced one
    for where, bad in ((2, float("nan")), (0, float("inf"))):
        inputs = [t.clone() for t in tensors]
        if group.rank == group.world_size - 1:
            inputs[where][1] = bad
        _, tr = R.all_reduce_mean(inputs, buckets, trailer, group)
        out[f"nonfinite {where}"] = tr.clone()
    return out

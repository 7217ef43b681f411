"""Per-step cost of ``SVI.step``: distsvi vs the same model hand-written in torch (and Pyro).

Run: ``python benchmarks/step_overhead.py [--steps 300] [--rounds 5]``

For each model the three implementations run interleaved, in rounds, in one process on
one thread; the table gives the median microseconds per step and the ratios to the
hand-written torch step (sample with ``rsample``, ``log_prob``, ``backward``,
``torch.optim.Adam``), which is the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.distributions import constraints

N, D, B = 10_000, 50, 256
GROUPS, PER_GROUP = 100, 10


def logreg_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    w = torch.randn(D, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=g)
    return X, y


def hier_data():
    g = torch.Generator().manual_seed(0)
    group = torch.arange(GROUPS).repeat_interleave(PER_GROUP)
    theta = 2.0 + torch.randn(GROUPS, generator=g)
    y = theta[group] + torch.randn(len(group), generator=g)
    return group, y


def ppl_logreg(pyro, dist):
    """Logistic regression with a mean-field guide of ``pyro.param``s."""

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N, subsample_size=B) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w + b), obs=y[idx])

    def guide(X, y):
        w_loc = pyro.param("w_loc", torch.zeros(D))
        w_scale = pyro.param("w_scale", torch.full((D,), 0.1), constraint=constraints.positive)
        b_loc = pyro.param("b_loc", torch.tensor(0.0))
        b_scale = pyro.param("b_scale", torch.tensor(0.1), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
        pyro.sample("b", dist.Normal(b_loc, b_scale))

    return model, guide, logreg_data()


def ppl_hier(pyro, dist):
    """Normal hierarchical model: global mean and spread, 100 group means."""
    group, y = hier_data()

    def model(group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with pyro.plate("groups", GROUPS):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(theta[group], 1.0), obs=y)

    def guide(group, y):
        mu_loc = pyro.param("mu_loc", torch.tensor(0.0))
        mu_scale = pyro.param("mu_scale", torch.tensor(0.1), constraint=constraints.positive)
        tau_loc = pyro.param("tau_loc", torch.tensor(0.0))
        tau_scale = pyro.param("tau_scale", torch.tensor(0.1), constraint=constraints.positive)
        t_loc = pyro.param("theta_loc", torch.zeros(GROUPS))
        t_scale = pyro.param(
            "theta_scale", torch.full((GROUPS,), 0.1), constraint=constraints.positive
        )
        pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
        pyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
        with pyro.plate("groups", GROUPS):
            pyro.sample("theta", dist.Normal(t_loc, t_scale))

    return model, guide, (group, y)


def torch_logreg(compiled: bool = False):
    """The logistic regression step written by hand."""
    X, y = logreg_data()
    Normal, Bernoulli = torch.distributions.Normal, torch.distributions.Bernoulli
    w_loc = torch.zeros(D, requires_grad=True)
    w_us = torch.full((D,), 0.1).log().requires_grad_()
    b_loc = torch.tensor(0.0, requires_grad=True)
    b_us = torch.tensor(0.1).log().requires_grad_()
    opt = torch.optim.Adam([w_loc, w_us, b_loc, b_us], lr=0.01)

    def loss_fn():
        qw, qb = Normal(w_loc, w_us.exp()), Normal(b_loc, b_us.exp())
        w, b = qw.rsample(), qb.rsample()
        idx = torch.randperm(N)[:B]
        logp = Normal(torch.zeros(D), 1.0).log_prob(w).sum() + Normal(0.0, 1.0).log_prob(b)
        logp = logp + (N / B) * Bernoulli(logits=X[idx] @ w + b).log_prob(y[idx]).sum()
        return -(logp - qw.log_prob(w).sum() - qb.log_prob(b))

    return _hand_step(loss_fn, opt, compiled)


def _hand_step(loss_fn, opt, compiled: bool):
    """zero_grad, backward, Adam; with ``compiled``, loss and Adam step through torch.compile."""
    if compiled:
        loss_fn = torch.compile(loss_fn)
        opt_step = torch.compile(opt.step)
    else:
        opt_step = opt.step

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()
        return loss.item()

    return step


def torch_hier(compiled: bool = False):
    """The hierarchical model step written by hand."""
    group, y = hier_data()
    Normal, LogNormal = torch.distributions.Normal, torch.distributions.LogNormal
    p = {
        "mu_loc": torch.tensor(0.0),
        "mu_us": torch.tensor(0.1).log(),
        "tau_loc": torch.tensor(0.0),
        "tau_us": torch.tensor(0.1).log(),
        "t_loc": torch.zeros(GROUPS),
        "t_us": torch.full((GROUPS,), 0.1).log(),
    }
    for v in p.values():
        v.requires_grad_()
    opt = torch.optim.Adam(list(p.values()), lr=0.01)

    def loss_fn():
        qmu = Normal(p["mu_loc"], p["mu_us"].exp())
        qtau = LogNormal(p["tau_loc"], p["tau_us"].exp())
        qt = Normal(p["t_loc"], p["t_us"].exp())
        mu, tau, theta = qmu.rsample(), qtau.rsample(), qt.rsample()
        logp = Normal(0.0, 10.0).log_prob(mu) + LogNormal(0.0, 1.0).log_prob(tau)
        logp = logp + Normal(mu, tau).expand([GROUPS]).log_prob(theta).sum()
        logp = logp + Normal(theta[group], 1.0).log_prob(y).sum()
        logq = qmu.log_prob(mu) + qtau.log_prob(tau) + qt.log_prob(theta).sum()
        return -(logp - logq)

    return _hand_step(loss_fn, opt, compiled)


def svi_step(pyro_mod, infer, optim, dist, build, **svi_kwargs):
    model, guide, data = build(pyro_mod, dist)
    svi = infer.SVI(model, guide, optim.Adam({"lr": 0.01}), infer.Trace_ELBO(), **svi_kwargs)

    def step():
        # each implementation keeps its own params: swap its store in around the step
        store = pyro_mod.get_param_store()
        saved = store._params, store._constraints, getattr(store, "_transforms", None)
        store._params, store._constraints = own["params"], own["constraints"]
        if saved[2] is not None:
            store._transforms = own["transforms"]
        try:
            return svi.step(*data)
        finally:
            store._params, store._constraints = saved[0], saved[1]
            if saved[2] is not None:
                store._transforms = saved[2]

    own = {"params": {}, "constraints": {}, "transforms": {}}
    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per round and implementation")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    import distsvi
    import distsvi.distributions as ddist
    from distsvi import infer as dinfer
    from distsvi import optim as doptim

    try:
        import pyro
        import pyro.distributions as pdist
        from pyro import infer as pinfer
        from pyro import optim as poptim
    except ImportError:
        pyro = None

    models = {
        f"logistic regression N={N} D={D} B={B}": (ppl_logreg, torch_logreg),
        f"hierarchical, {GROUPS} groups": (ppl_hier, torch_hier),
    }
    rows = []
    for label, (ppl_build, torch_build) in models.items():
        impls = {
            "torch": torch_build(),
            "distsvi": svi_step(distsvi, dinfer, doptim, ddist, ppl_build),
            "torch compiled": torch_build(compiled=True),
            "distsvi compiled": svi_step(distsvi, dinfer, doptim, ddist, ppl_build, compile=True),
        }
        if pyro is not None:
            impls["pyro"] = svi_step(pyro, pinfer, poptim, pdist, ppl_build)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for step in impls.values():
            time_steps(step, 50)  # warm-up: params created, allocator warm
        for _ in range(args.rounds):
            for name, step in impls.items():
                times[name] += time_steps(step, args.steps)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        rows.append((label, med))

    print(
        f"median us per step, 1 thread, torch {torch.__version__}"
        + (f", pyro {pyro.__version__}" if pyro else "")
    )
    print(
        "| model | torch eager | distsvi eager | pyro | distsvi / torch | pyro / torch "
        "| torch compiled | distsvi compiled | compiled ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, med in rows:
        t, d, p = med["torch"], med["distsvi"], med.get("pyro")
        tc, dc = med["torch compiled"], med["distsvi compiled"]
        pyro_us = "-" if p is None else f"{p:.0f}"
        pyro_ratio = "-" if p is None else f"{p / t:.2f}"
        print(
            f"| {label} | {t:.0f} | {d:.0f} | {pyro_us} | {d / t:.2f} | {pyro_ratio} "
            f"| {tc:.0f} | {dc:.0f} | {dc / tc:.2f} |"
        )


if __name__ == "__main__":
    main()

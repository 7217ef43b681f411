"""Every autoguide against Pyro 1.9.2's over 10 Adam steps: the same seed gives the same
draws, so the params must agree step for step (softplus scales, Pyro's parameterisations of
the multivariate guides), and guide traces have Pyro's sites: names, kinds, distribution
types and shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import both

N = 6
Y = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
GUIDES = [
    "AutoNormal",
    "AutoDelta",
    "AutoDiagonalNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
]


def model(P, y):
    C = P.constraints
    mu = P.pyro.sample("mu", P.dist.Normal(torch.tensor(0.0, dtype=y.dtype), 2.0))
    tau = P.pyro.sample("tau", P.dist.HalfCauchy(torch.tensor(1.0, dtype=y.dtype)))
    w = P.pyro.sample("w", P.dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
    p = P.pyro.sample("p", P.dist.Beta(torch.tensor(2.0, dtype=y.dtype), 2.0))
    assert C is not None
    with P.pyro.plate("data", N):
        theta = P.pyro.sample("theta", P.dist.Normal(mu, tau))
        P.pyro.sample("y", P.dist.Normal(theta + w[0] - p, 0.5), obs=y)


def _guide(P, name, bound):
    from importlib import import_module

    return getattr(import_module(f"{P.name}.infer.autoguide"), name)(bound)


def trajectory(P, name: str, steps: int = 10) -> list[dict]:
    P.pyro.clear_param_store()
    torch.manual_seed(0)

    def bound(y):
        return model(P, y)

    guide = _guide(P, name, bound)
    svi = P.infer.SVI(bound, guide, P.optim.Adam({"lr": 0.05}), P.infer.Trace_ELBO())
    store = P.pyro.get_param_store()
    out = []
    for _ in range(steps):
        loss = svi.step(Y)
        out.append((loss, {k: store[k].detach().clone() for k in store.keys()}))
    P.pyro.clear_param_store()
    return out


@pytest.mark.parametrize("name", GUIDES)
def test_ten_adam_steps_match_pyro(name):
    want, got = (trajectory(P, name) for P in both())
    for step, ((want_loss, want_p), (got_loss, got_p)) in enumerate(zip(want, got)):
        assert abs(got_loss - want_loss) <= 1e-6 * max(1.0, abs(want_loss)), f"loss, step {step}"
        assert set(got_p) == set(want_p), f"param names, step {step}"
        for k, v in want_p.items():
            torch.testing.assert_close(
                got_p[k], v, rtol=0, atol=1e-6, msg=lambda m: f"{k}, step {step}: {m}"
            )


def _sites(P, name: str) -> list[tuple]:
    P.pyro.clear_param_store()
    torch.manual_seed(0)

    def bound(y):
        return model(P, y)

    guide = _guide(P, name, bound)
    trace = P.poutine.trace(guide).get_trace(Y)
    sites = []
    for site_name, site in trace.nodes.items():
        if site["type"] not in ("sample", "param"):
            continue
        if site["type"] == "sample" and site["is_observed"]:
            continue
        if type(site.get("fn")).__name__ == "_Subsample":
            continue  # Pyro records a plate's indices as a sample site; distsvi as "subsample"
        fn = type(site["fn"]).__name__ if site["type"] == "sample" else None
        aux = bool(site.get("infer", {}).get("is_auxiliary", False))
        sites.append((site_name, site["type"], fn, tuple(site["value"].shape), aux))
    P.pyro.clear_param_store()
    return sites


@pytest.mark.parametrize("name", GUIDES)
def test_guide_traces_have_pyros_sites(name):
    want, got = (_sites(P, name) for P in both())
    want_samples = [s for s in want if s[1] == "sample"]
    got_samples = [s for s in got if s[1] == "sample"]
    assert got_samples == want_samples
    # params: the same names and shapes (Pyro records a param site per attribute read)
    assert {s[0]: s[3] for s in got if s[1] == "param"} == {
        s[0]: s[3] for s in want if s[1] == "param"
    }


def test_autonormal_trace_delta_carries_the_jacobian():
    for P in both():
        P.pyro.clear_param_store()
        torch.manual_seed(0)
        guide = _guide(P, "AutoNormal", lambda y: model(P, y))
        trace = P.poutine.trace(guide).get_trace(Y)
        trace.compute_log_prob()
        u = trace.nodes["tau_unconstrained"]["value"]
        # tau = exp(u): log |d u / d tau| = -u
        torch.testing.assert_close(trace.nodes["tau"]["log_prob"], -u)
        assert torch.equal(trace.nodes["mu"]["log_prob"], torch.zeros_like(u))
    P.pyro.clear_param_store()

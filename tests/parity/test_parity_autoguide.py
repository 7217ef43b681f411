"""AutoNormal against Pyro 1.9.2's AutoNormal: same param names, same draws (same seed),
same loss and the same gradients with respect to the unconstrained params (both store
scales as softplus_positive).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, both

N, B = 20, 7
X = torch.linspace(-1.0, 3.0, N, dtype=torch.float64)


def model(P, x):
    mu = P.pyro.sample("mu", P.dist.Normal(0.0, 3.0))
    sigma = P.pyro.sample("sigma", P.dist.LogNormal(0.0, 1.0))
    with P.pyro.plate("data", N, subsample_size=B) as idx:
        z = P.pyro.sample("z", P.dist.Normal(mu, 1.0))
        P.pyro.sample("x", P.dist.Normal(z, sigma), obs=x[idx])


def full_model(P, x):
    mu = P.pyro.sample("mu", P.dist.Normal(0.0, 3.0))
    sigma = P.pyro.sample("sigma", P.dist.LogNormal(0.0, 1.0))
    with P.pyro.plate("data", N):
        z = P.pyro.sample("z", P.dist.Normal(mu, 1.0))
        P.pyro.sample("x", P.dist.Normal(z, sigma), obs=x)


def run(P, loss: str, elbo_kwargs: dict, guide_name: str = "AutoNormal", fn=model) -> list:
    from importlib import import_module

    autoguide = import_module(f"{P.name}.infer.autoguide")
    P.pyro.clear_param_store()
    torch.manual_seed(0)

    def bound(x):
        return fn(P, x)

    guide = getattr(autoguide, guide_name)(bound)
    elbo = getattr(P.infer, loss)(**elbo_kwargs)
    store = P.pyro.get_param_store()
    calls = []
    for _ in range(3):
        value = elbo.loss_and_grads(bound, guide, X)
        params = {}
        for name, u in store.named_parameters():
            c = store[name].detach()
            params[name] = (c.clone(), u.grad.clone())
            u.grad = None
        calls.append((float(value), params))
    P.pyro.clear_param_store()
    return calls


def assert_same_calls(got: list, want: list) -> None:
    for call, ((want_loss, want_params), (got_loss, got_params)) in enumerate(zip(want, got)):
        assert_close(got_loss, want_loss, f"loss, call {call}")
        assert set(got_params) == set(want_params)
        for name, (want_value, want_grad) in want_params.items():
            assert_close(got_params[name][0], want_value, f"{name}, call {call}")
            assert_close(got_params[name][1], want_grad, f"gradient of {name}, call {call}")


@pytest.mark.parametrize(
    "loss, elbo_kwargs",
    [
        ("Trace_ELBO", {}),
        ("Trace_ELBO", {"num_particles": 4, "vectorize_particles": True}),
        ("TraceGraph_ELBO", {}),
    ],
    ids=["trace", "trace_vectorized", "tracegraph"],
)
def test_autonormal_matches_pyro(loss, elbo_kwargs):
    want, got = (run(P, loss, elbo_kwargs) for P in both())
    assert_same_calls(got, want)


@pytest.mark.parametrize(
    "guide_name, fn",
    [("AutoDelta", model), ("AutoDiagonalNormal", full_model)],
    ids=["AutoDelta", "AutoDiagonalNormal"],
)
def test_other_autoguides_match_pyro(guide_name, fn):
    want, got = (run(P, "Trace_ELBO", {}, guide_name, fn) for P in both())
    assert_same_calls(got, want)

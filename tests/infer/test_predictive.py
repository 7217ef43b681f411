"""Predictive: Pyro's return sites and shapes, and analytic prior predictive moments."""

from __future__ import annotations

import importlib

import pytest
import torch

import distsvi
from distsvi.infer import Predictive
from distsvi.infer.autoguide import AutoNormal

X = torch.randn(6, generator=torch.Generator().manual_seed(2))


def make_model(name: str):
    pyro = importlib.import_module(name)
    dist = importlib.import_module(f"{name}.distributions")

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
        pyro.deterministic("two_mu", 2 * mu)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, s), obs=x)
        return mu

    return model


CASES = {
    "prior": {"num_samples": 9},
    "prior_return_sites": {"num_samples": 9, "return_sites": ["mu", "x", "_RETURN"]},
    "guide": {"num_samples": 9, "guide": True},
    "guide_return_sites": {"num_samples": 9, "guide": True, "return_sites": ["z", "two_mu"]},
    "posterior_samples": {"posterior_samples": True},
    "posterior_samples_return_sites": {"posterior_samples": True, "return_sites": ["mu", "x"]},
}


def run(name: str, case: dict, parallel: bool) -> dict:
    model = make_model(name)
    kwargs = {k: v for k, v in case.items() if k not in ("guide", "posterior_samples")}
    if case.get("guide"):
        autoguide = importlib.import_module(f"{name}.infer.autoguide")
        guide = autoguide.AutoNormal(model)
        guide(X)
        kwargs["guide"] = guide
    if case.get("posterior_samples"):
        kwargs["posterior_samples"] = {"mu": torch.randn(9), "s": torch.rand(9) + 0.5}
    predictive = importlib.import_module(f"{name}.infer").Predictive
    return predictive(model, parallel=parallel, **kwargs)(X)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("case", list(CASES))
def test_return_sites_and_shapes_match_pyro(case, parallel):
    pytest.importorskip("pyro")
    import pyro

    pyro.clear_param_store()
    want = run("pyro", CASES[case], parallel)
    got = run("distsvi", CASES[case], parallel)
    assert list(got) == list(want)
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        k: tuple(v.shape) for k, v in want.items()
    }


def test_conditions_on_posterior_samples():
    samples = {"mu": torch.tensor([-50.0, 0.0, 50.0]), "s": torch.full((3,), 0.01)}
    out = Predictive(make_model("distsvi"), posterior_samples=samples)(X)
    assert torch.allclose(out["two_mu"].squeeze(-1), 2 * samples["mu"])
    assert (out["z"][0] < -40).all() and (out["z"][2] > 40).all()


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_prior_predictive_moments_are_analytic(parallel):
    # mu ~ N(1, 2^2), x_i | mu ~ N(mu, 1): E x_i = 1, Var x_i = 5, Cov(x_i, x_j) = 4
    def model(n):
        mu = distsvi.sample("mu", distsvi.distributions.Normal(1.0, 2.0))
        with distsvi.plate("data", n):
            return distsvi.sample("x", distsvi.distributions.Normal(mu, 1.0))

    num = 20000 if parallel else 2000
    x = Predictive(model, num_samples=num, parallel=parallel)(3)["x"]
    assert x.shape == (num, 3)
    cov = torch.cov(x.T)
    tol = 5 / num**0.5  # about 5 standard errors
    assert (x.mean(0) - 1.0).abs().max() < 2.2 * tol
    assert (cov.diag() - 5.0).abs().max() < 5.0 * 1.5 * tol * 2**0.5
    assert (cov[0, 1] - 4.0).abs() < 5.0 * 1.5 * tol * 2**0.5


def test_guide_predictive_uses_the_trained_guide():
    model = make_model("distsvi")
    guide = AutoNormal(model)
    guide(X)
    distsvi.get_param_store()["AutoNormal.locs.mu"] = torch.tensor(7.0)
    out = Predictive(model, guide=guide, num_samples=500, parallel=True)(X)
    assert (out["mu"].mean() - 7.0).abs() < 0.1
    with pytest.raises(ValueError, match="not both"):
        Predictive(model, guide=guide, posterior_samples={"mu": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_samples"):
        Predictive(model)

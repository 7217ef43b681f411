"""The autoguide surface Pyro users read, against Pyro 1.9.2: ``call()``, ``locs``/``scales``
by attribute, ``loc``/``scale``, ``get_posterior``, ``sample_latent``, ``get_base_dist``,
``get_transform``, ``init_to_generated`` and ``InitMessenger``."""

from __future__ import annotations

from importlib import import_module

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import both

Y = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)


def model(P, y):
    mu = P.pyro.sample("mu", P.dist.Normal(torch.tensor(0.0, dtype=y.dtype), 2.0))
    tau = P.pyro.sample("tau", P.dist.LogNormal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with P.pyro.plate("data", len(y)):
        P.pyro.sample("y", P.dist.Normal(mu, tau), obs=y)


def autoguide(P):
    return import_module(f"{P.name}.infer.autoguide")


def initialization(P):  # where Pyro keeps InitMessenger
    return import_module(f"{P.name}.infer.autoguide.initialization")


def fresh(P, name, **kwargs):
    P.pyro.clear_param_store()
    torch.manual_seed(0)
    guide = getattr(autoguide(P), name)(lambda y: model(P, y), **kwargs)
    guide(Y)  # builds the prototype and params
    return guide


def test_call_returns_the_values_sorted_by_site_name():
    for P in both():
        guide = fresh(P, "AutoNormal")
        torch.manual_seed(1)
        values = guide.call(Y)
        torch.manual_seed(1)
        want = guide(Y)
        assert isinstance(values, tuple) and len(values) == 2
        for got, name in zip(values, sorted(want)):
            assert torch.equal(got, want[name])


def test_autonormal_locs_and_scales_by_attribute():
    got = {}
    for P in both():
        guide = fresh(P, "AutoNormal", init_scale=0.3)
        got[P.name] = (guide.locs.tau.detach(), guide.scales.tau.detach(), guide.scales.mu.detach())
    for a, b in zip(got["pyro"], got["distsvi"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert float(got["distsvi"][1]) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "name", ["AutoDiagonalNormal", "AutoMultivariateNormal", "AutoLowRankMultivariateNormal"]
)
def test_continuous_guides_posterior_and_latent(name):
    out = {}
    for P in both():
        guide = fresh(P, name)
        posterior = guide.get_posterior(Y)
        torch.manual_seed(3)
        latent = guide.sample_latent(Y)
        x = torch.linspace(-0.5, 0.5, guide.latent_dim, dtype=torch.float64)
        out[P.name] = dict(
            loc=guide.loc.detach(),
            scale=guide.scale.detach(),
            mean=posterior.mean.detach(),
            lp=posterior.log_prob(x).detach(),
            latent=latent.detach(),
            dim=guide.latent_dim,
        )
        if name != "AutoLowRankMultivariateNormal":
            base, transform = guide.get_base_dist(), guide.get_transform(Y)
            u = torch.linspace(-1.0, 1.0, guide.latent_dim, dtype=torch.float64)
            y = transform(u)
            out[P.name]["base_lp"] = base.log_prob(u).detach()
            out[P.name]["t"] = y.detach()
            out[P.name]["ladj"] = transform.log_abs_det_jacobian(u, y).sum().detach()
            out[P.name]["inv"] = transform.inv(y).detach()
    for key, want in out["pyro"].items():
        torch.testing.assert_close(
            torch.as_tensor(out["distsvi"][key]), torch.as_tensor(want), msg=lambda m: f"{key}: {m}"
        )


def test_autodelta_site_by_attribute():
    got = {P.name: fresh(P, "AutoDelta").tau.detach() for P in both()}
    torch.testing.assert_close(got["distsvi"], got["pyro"])


def test_init_to_generated_calls_generate_once_per_model_run():
    for P in both():
        ag = autoguide(P)
        calls = []

        def generate():
            calls.append(1)
            return ag.init_to_value(values={"mu": torch.tensor(float(len(calls)))})

        init = ag.init_to_generated(generate=generate)
        seen = []
        for _ in range(3):
            with initialization(P).InitMessenger(init):
                trace = P.poutine.trace(lambda: model(P, Y)).get_trace()
            seen.append(float(trace.nodes["mu"]["value"]))
        assert seen == [1.0, 2.0, 3.0], P.name
        assert len(calls) == 3


def test_init_messenger_sets_latent_values():
    got = {}
    for P in both():
        ag = autoguide(P)
        torch.manual_seed(0)
        with initialization(P).InitMessenger(ag.init_to_median(num_samples=7)):
            trace = P.poutine.trace(lambda: model(P, Y)).get_trace()
        got[P.name] = (trace.nodes["mu"]["value"], trace.nodes["tau"]["value"])
    for a, b in zip(got["distsvi"], got["pyro"]):
        torch.testing.assert_close(a, b)

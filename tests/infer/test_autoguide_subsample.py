"""Autoguides under subsampling: per-datapoint params of full size, only the current
subsample's rows touched, the model's own indices used, subsample sizes that change."""

from __future__ import annotations

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import poutine
from distsvi.infer import SVI, Trace_ELBO
from distsvi.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from distsvi.optim import Adam

N = 100
X = torch.randn(N, generator=torch.Generator().manual_seed(3)) + 2.0


def model(x, idx=None, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", N, subsample=idx, subsample_size=subsample_size) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, sigma), obs=x[ind])


def store_value(name: str) -> torch.Tensor:
    return pyro.get_param_store()._params[name].detach().clone()


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDelta])
def test_params_outside_the_models_subsample_stay_bit_identical(guide_cls):
    guide = guide_cls(model)
    names = (
        ["AutoNormal.locs.z", "AutoNormal.scales.z"] if guide_cls is AutoNormal else ["AutoDelta.z"]
    )
    svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    guide(X, torch.arange(5))  # create the params (a guide call changes nothing)
    before = {n: store_value(n) for n in names}
    assert all(v.shape == (N,) for v in before.values())

    idx = torch.tensor([7, 3, 50, 99, 12, 64])
    svi.step(X, idx)
    outside = torch.ones(N, dtype=torch.bool)
    outside[idx] = False
    for n in names:
        after = store_value(n)
        assert torch.equal(after[outside], before[n][outside]), n  # bit-identical
        assert (after[idx] != before[n][idx]).all(), n  # the subsample's rows moved

    # A second step from non-zero Adam moments: rows never in a subsample still have zero
    # moments, so they stay bit-identical; rows of the first subsample keep moving by
    # momentum, as torch's Adam does (and Pyro's).
    idx2 = torch.tensor([1, 2, 3, 4])
    mid = {n: store_value(n) for n in names}
    svi.step(X, idx2)
    never = outside.clone()
    never[idx2] = False
    for n in names:
        after = store_value(n)
        assert torch.equal(after[never], before[n][never]), n
        assert not torch.equal(after[torch.tensor([7, 50])], mid[n][torch.tensor([7, 50])])


def test_guide_uses_the_models_explicit_indices():
    guide = AutoNormal(model)
    idx = torch.tensor([5, 3, 99])
    guide_trace = poutine.trace(guide).get_trace(X, idx)
    assert torch.equal(guide_trace.nodes["data"]["value"], idx)
    locs = torch.arange(float(N))
    pyro.get_param_store()["AutoNormal.locs.z"] = locs
    guide_trace = poutine.trace(guide).get_trace(X, idx)
    assert torch.equal(guide_trace.nodes["z_unconstrained"]["fn"].mean, locs[idx])
    # the model's own plate keeps its indices, and its sites get the guide's rows
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(X, idx)
    assert torch.equal(model_trace.nodes["z"]["value"], guide_trace.nodes["z"]["value"])


def test_drawn_subsample_is_drawn_by_the_guide_and_replayed_into_the_model():
    guide = AutoNormal(model)
    guide_trace = poutine.trace(guide).get_trace(X, None, 7)
    idx = guide_trace.nodes["data"]["value"]
    assert idx.shape == (7,)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(X, None, 7)
    assert torch.equal(model_trace.nodes["data"]["value"], idx)
    assert model_trace.nodes["x"]["scale"] == N / 7


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDelta])
@pytest.mark.parametrize("how", ["explicit", "drawn"])
def test_subsample_size_may_change_between_steps(guide_cls, how):
    guide = guide_cls(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    perm = torch.randperm(N)
    for size in (32, 17, 32, 5, 17):
        if how == "explicit":
            idx = perm[:size]
            loss = svi.step(X, idx)
            tr = poutine.trace(guide).get_trace(X, idx)
        else:
            loss = svi.step(X, None, size)
            tr = poutine.trace(guide).get_trace(X, None, size)
        assert torch.isfinite(torch.tensor(loss))
        assert tr.nodes["z"]["value"].shape == (size,)


def test_a_shard_handler_fills_the_guides_subsample():
    # What the data-parallel layer does: a handler around the step fills the plate's
    # subsample message with this rank's indices; the guide's draw goes through it.
    shard = torch.arange(50, 100)

    class Shard(pyro.poutine.Messenger):
        def process_message(self, msg):
            if msg["type"] == "subsample" and msg["name"] == "data" and msg["value"] is None:
                msg["value"] = shard[torch.randperm(len(shard))[: msg["kwargs"]["subsample_size"]]]
                msg["scale"] = N / msg["kwargs"]["subsample_size"]

    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    with Shard():
        svi.step(X, None, 10)  # creates the params
    before = store_value("AutoNormal.locs.z")
    with Shard():
        svi.step(X, None, 10)
        guide_trace = poutine.trace(guide).get_trace(X, None, 10)
    assert (guide_trace.nodes["data"]["value"] >= 50).all()
    after = store_value("AutoNormal.locs.z")
    assert torch.equal(after[:50], before[:50])


def test_create_plates_replaces_the_probe():
    calls = []

    def create_plates(x, idx=None, subsample_size=None):
        calls.append(idx)
        return pyro.plate("data", N, subsample=idx)

    guide = AutoNormal(model, create_plates=create_plates)
    idx = torch.tensor([4, 8])
    tr = poutine.trace(guide).get_trace(X, idx)
    assert torch.equal(tr.nodes["data"]["value"], idx) and len(calls) == 1


def test_autoguide_list_parts_share_one_subsample():
    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["mu", "sigma"])))
    guide.append(AutoDelta(poutine.block(model, expose=["mu", "sigma"])))
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for size in (8, 3):
        svi.step(X, None, size)
    names = set(pyro.get_param_store().keys())
    assert names == {
        "AutoGuideList.0.locs.z",
        "AutoGuideList.0.scales.z",
        "AutoGuideList.1.mu",
        "AutoGuideList.1.sigma",
    }
    tr = poutine.trace(guide).get_trace(X, None, 6)
    assert tr.nodes["z"]["value"].shape == (6,)
    assert set(guide.median(X)) == {"z", "mu", "sigma"}


def test_plates_hidden_from_the_probe_are_reported():
    def hidden(x, idx):
        with poutine.block(hide_types=["subsample"]):
            model(x, idx)

    guide = AutoNormal(hidden)
    with pytest.warns(UserWarning, match=r"plate\(s\) \['data'\]"):
        guide(X, torch.arange(3))


def test_an_explicit_permutation_of_all_indices_is_followed():
    guide = AutoNormal(model)
    perm = torch.randperm(N)
    guide(X, perm)
    locs = torch.arange(float(N))
    pyro.get_param_store()["AutoNormal.locs.z"] = locs
    guide_trace = poutine.trace(guide).get_trace(X, perm)
    assert torch.equal(guide_trace.nodes["z_unconstrained"]["fn"].mean, locs[perm])

"""``distsvi.distributions``: torch's classes with Pyro's shape helpers, Delta, constraints."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import poutine
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam


def test_constraints_are_torchs_plus_pyros_softplus_ones():
    for name in torch.distributions.constraints.__all__:
        assert getattr(dist.constraints, name) is getattr(torch.distributions.constraints, name)
    c = dist.constraints.softplus_positive
    x = torch.tensor([-30.0, 0.0, 3.0, 30.0])
    t = torch.distributions.transform_to(c)
    assert torch.allclose(t(x), torch.nn.functional.softplus(x))
    assert torch.allclose(t.inv(t(x[1:])), x[1:])
    assert torch.distributions.biject_to(c) == t
    m = torch.randn(3, 3)
    L = torch.distributions.transform_to(dist.constraints.unit_lower_cholesky)(m)
    assert dist.constraints.unit_lower_cholesky.check(L)
    assert not dist.constraints.unit_lower_cholesky.check(m)


def test_every_torch_distribution_class_is_exported():
    for name in torch.distributions.__all__:
        cls = getattr(torch.distributions, name)
        if inspect.isclass(cls) and issubclass(cls, torch.distributions.Distribution):
            ours = getattr(dist, name)
            assert issubclass(ours, cls), name


def test_to_event():
    d = dist.Normal(torch.zeros(4, 3), 1.0).to_event(1)
    assert d.batch_shape == (4,) and d.event_shape == (3,)
    x = torch.randn(4, 3)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(d.log_prob(x), want)
    all_ = dist.Normal(torch.zeros(4, 3), 1.0).to_event()
    assert all_.batch_shape == () and all_.event_shape == (4, 3)
    assert dist.Normal(0.0, 1.0).to_event(0).batch_shape == ()


def test_expand_and_expand_by():
    d = dist.Normal(torch.zeros(3), 1.0)
    e = d.expand([2, 3])
    assert e.batch_shape == (2, 3) and e.sample().shape == (2, 3)
    f = d.expand_by([5])
    assert f.batch_shape == (5, 3)
    g = dist.Bernoulli(0.3).expand_by([2, 2]).to_event(1)
    assert g.batch_shape == (2,) and g.event_shape == (2,)


def test_mask():
    m = torch.tensor([True, False, True])
    d = dist.Normal(torch.zeros(3), 1.0).mask(m)
    x = torch.tensor([0.5, 1.0, -1.0])
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x) * m
    torch.testing.assert_close(d.log_prob(x), want)
    assert d.batch_shape == (3,)
    assert torch.all(dist.Normal(0.0, 1.0).mask(False).log_prob(torch.tensor([1.0, 2.0])) == 0)
    # a masked distribution still samples with the base distribution's shape
    assert d.sample().shape == (3,)
    assert d.has_rsample


def test_delta():
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    d = dist.Delta(v)
    assert d.batch_shape == (2,) and d.event_shape == ()
    assert d.has_rsample
    assert torch.equal(d.rsample(), v)
    torch.testing.assert_close(d.log_prob(torch.tensor([1.0, 2.0])), torch.zeros(2))
    assert d.log_prob(torch.tensor([1.0, 3.0]))[1].item() == -math.inf
    (d.rsample().sum()).backward()
    assert torch.equal(v.grad, torch.ones(2))
    e = dist.Delta(torch.zeros(4, 3), event_dim=1)
    assert e.batch_shape == (4,) and e.event_shape == (3,)
    assert e.log_prob(torch.zeros(4, 3)).shape == (4,)
    ld = dist.Delta(torch.tensor(0.5), log_density=torch.tensor(-1.5))
    assert ld.log_prob(torch.tensor(0.5)).item() == -1.5
    assert dist.Delta(torch.tensor(1.0)).expand([3]).batch_shape == (3,)


def test_distribution_call_draws_a_sample():
    x = dist.Normal(torch.zeros(2), 1.0)()
    assert x.shape == (2,)


def test_plain_torch_distribution_is_accepted_by_sample():
    tr = poutine.trace(
        lambda: pyro.sample("x", torch.distributions.Normal(torch.zeros(3), 1.0))
    ).get_trace()
    tr.compute_log_prob()
    x = tr.nodes["x"]["value"]
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum()
    torch.testing.assert_close(tr.nodes["x"]["log_prob_sum"], want)


def test_plain_torch_distribution_in_a_plate_and_svi():
    data = torch.tensor([1.0, 2.0, 3.0])

    def model():
        mu = pyro.sample("mu", torch.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("obs", torch.distributions.Normal(mu, 1.0), obs=data)

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", torch.distributions.Normal(loc, 0.1))

    svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(3):
        loss = svi.step()
    assert isinstance(loss, float) and math.isfinite(loss)
    assert pyro.param("loc").item() > 0.0  # moved towards the data


def test_pyro_distribution_object_is_accepted():
    pd = pytest.importorskip("pyro.distributions")
    data = torch.tensor([0.5, 1.5])

    def model():
        mu = pyro.sample("mu", pd.Normal(0.0, 1.0))
        with pyro.plate("data", 2):
            pyro.sample("obs", pd.Normal(mu, 1.0), obs=data)
        pyro.sample("v", pd.Normal(torch.zeros(2), 1.0).to_event(1))

    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    mu = tr.nodes["mu"]["value"]
    v = tr.nodes["v"]["value"]
    want = (
        torch.distributions.Normal(0.0, 1.0).log_prob(mu)
        + torch.distributions.Normal(mu, 1.0).log_prob(data).sum()
        + torch.distributions.Normal(0.0, 1.0).log_prob(v).sum()
    )
    torch.testing.assert_close(tr.log_prob_sum(), want)

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", pd.Normal(loc, 0.5))
        pyro.sample("v", pd.Delta(torch.zeros(2), event_dim=1))

    loss = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO()).step()
    assert math.isfinite(loss)


def test_mask_then_to_event_and_to_event_then_mask():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    base = torch.distributions.Normal(0.0, 1.0).log_prob(x)
    m = torch.tensor([[True, False], [True, True]])
    d1 = dist.Normal(torch.zeros(2, 2), 1.0).mask(m).to_event(1)
    torch.testing.assert_close(d1.log_prob(x), (base * m).sum(-1))
    row = torch.tensor([False, True])
    d2 = dist.Normal(torch.zeros(2, 2), 1.0).to_event(1).mask(row)
    torch.testing.assert_close(d2.log_prob(x), base.sum(-1) * row)
    d3 = dist.Normal(0.0, 1.0).mask(torch.tensor([True, False])).expand([3, 2])
    assert d3.batch_shape == (3, 2)
    torch.testing.assert_close(
        d3.log_prob(torch.zeros(3, 2)),
        torch.distributions.Normal(0.0, 1.0).log_prob(torch.zeros(3, 2)) * torch.tensor([1.0, 0.0]),
    )


def test_shapes_of_samples_and_log_probs():
    d = dist.Normal(torch.zeros(3), 1.0).expand_by([2]).to_event(1)
    assert d.sample().shape == (2, 3)
    assert d.sample((4,)).shape == (4, 2, 3)
    assert d.log_prob(d.sample((4,))).shape == (4, 2)
    assert d.shape() == (2, 3) and d.shape((5,)) == (5, 2, 3)

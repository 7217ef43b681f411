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


# Normal, HalfNormal, HalfCauchy: their own formulas against torch's --------------------
def _leaf(*values):
    return torch.tensor(values, dtype=torch.float64).requires_grad_()


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("sample_shape", [(), (5,)])
def test_normal_scores_its_own_draw_as_torch_does_with_the_same_gradients(sample_shape):
    # A hierarchical guide: z1's draw sets z2's loc, so the gradient reaches z1's params
    # through z2's log-density both directly and through z2's draw.
    a, b, c, d = _leaf(0.3, -1.2), _leaf(0.7, 1.5), _leaf(0.2, 0.4), _leaf(-0.5, 0.9)
    leaves = [a, b, c, d]

    def elbo_terms(cls):
        torch.manual_seed(0)
        q1 = cls(a, b.exp())
        z1 = q1.rsample(sample_shape)
        q2 = cls(c * z1, d.exp())
        z2 = q2.rsample()
        # the draws feed a "model" term too, as in an ELBO
        return q1.log_prob(z1), q2.log_prob(z2), (z1**2 + z2.sin()).sum()

    ours = elbo_terms(dist.Normal)
    torchs = elbo_terms(torch.distributions.Normal)
    for o, t in zip(ours, torchs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12)
    loss_ours = sum(x.sum() for x in ours)
    loss_torch = sum(x.sum() for x in torchs)
    for go, gt in zip(_grads(loss_ours, leaves), _grads(loss_torch, leaves)):
        torch.testing.assert_close(go, gt, rtol=1e-10, atol=1e-12)


def test_normal_scores_a_draw_changed_in_place_or_another_value_by_the_formula():
    loc, scale = _leaf(0.5, -0.5), _leaf(1.5, 0.2)
    q, ref = dist.Normal(loc, scale), torch.distributions.Normal(loc, scale)
    z = q.rsample()
    with torch.no_grad():
        z.add_(3.0)  # the draw's noise no longer describes it
    torch.testing.assert_close(q.log_prob(z), ref.log_prob(z), rtol=1e-12, atol=0)
    other = z.detach().clone()
    torch.testing.assert_close(q.log_prob(other), ref.log_prob(other), rtol=1e-12, atol=0)
    # expand and to_event keep the class and still recognise their own draw
    e = q.expand([3, 2]).to_event(1)
    ze = e.rsample()
    torch.testing.assert_close(e.log_prob(ze), ref.expand([3, 2]).log_prob(ze).sum(-1))


@pytest.mark.parametrize(
    "build",
    [
        lambda cls, z: cls.Normal(z, 1.0),
        lambda cls, z: cls.Normal(0.0, 5.0),
        lambda cls, z: cls.Normal(2, 0.5),
        lambda cls, z: cls.HalfNormal(2.0),
        lambda cls, z: cls.HalfCauchy(2.0),
        lambda cls, z: cls.HalfCauchy(z.exp()),
        lambda cls, z: cls.HalfNormal(3.0).expand([4]),
        lambda cls, z: cls.HalfCauchy(0.7).expand([2, 4]),
        lambda cls, z: cls.Normal(1.0, 3.0).expand([2, 4]),
    ],
)
def test_number_parameters_score_as_torch(build):
    # float32, as models run: torch turns the numbers into float32 tensors, distsvi keeps
    # them as Python floats, so the two differ by float32 rounding only
    z = torch.tensor([0.3, -0.2, 1.1, 0.7], requires_grad=True)
    x = torch.tensor([0.5, 1.5, 0.01, 4.0], requires_grad=True)
    ours, torchs = build(dist, z), build(torch.distributions, z)
    assert type(ours).__name__ == type(torchs).__name__ and isinstance(ours, type(torchs))
    assert ours.batch_shape == torchs.batch_shape
    lo, lt = ours.log_prob(x), torchs.log_prob(x)
    assert lo.dtype == lt.dtype == torch.float32
    torch.testing.assert_close(lo, lt, rtol=1e-6, atol=1e-6)
    for go, gt in zip(_grads(lo.sum(), [x, z]), _grads(lt.sum(), [x, z]), strict=True):
        if gt is None:
            assert go is None
        else:
            torch.testing.assert_close(go, gt, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["HalfNormal", "HalfCauchy"])
def test_half_line_number_scale_is_minus_infinity_below_zero(name):
    x = torch.tensor([-1.0, 0.0, 2.0])
    with pyro.validation_enabled(False):
        ours = getattr(dist, name)(2.0).log_prob(x)
        torchs = getattr(torch.distributions, name)(2.0).log_prob(x)
    torch.testing.assert_close(ours, torchs)
    assert ours[0] == -math.inf
    with pytest.raises(ValueError, match="support"):
        getattr(dist, name)(2.0).log_prob(x)

"""``SVI``: Pyro's constructor forms, ``step``/``evaluate_loss``, and the ``grad_hook`` seam."""

from __future__ import annotations

import math

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from distsvi.optim import SGD, Adam

DATA = torch.tensor([0.5, 1.5, 1.0])


def model(data=DATA, shift=0.0):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(mu + shift, 1.0), obs=data)


def guide(data=DATA, shift=0.0):
    pyro.sample("mu", dist.Delta(pyro.param("mu_map", torch.tensor(0.2))))


def _loss_by_hand(m, data=DATA, shift=0.0):
    """-log p(m, data): the Trace_ELBO of a Delta guide at m."""
    m = torch.as_tensor(m)
    return -(
        torch.distributions.Normal(0.0, 1.0).log_prob(m)
        + torch.distributions.Normal(m + shift, 1.0).log_prob(data).sum()
    ).item()


def test_step_value_and_update():
    svi = SVI(model, guide, SGD({"lr": 0.1}), Trace_ELBO())
    loss = svi.step()
    assert isinstance(loss, float)
    assert loss == pytest.approx(_loss_by_hand(0.2), rel=1e-6)
    grad = 0.2 - (DATA - 0.2).sum().item()  # d/dm of -log p
    assert pyro.param("mu_map").item() == pytest.approx(0.2 - 0.1 * grad, rel=1e-6)


def test_step_passes_args_and_kwargs():
    svi = SVI(model, guide, SGD({"lr": 0.0}), Trace_ELBO())
    data = torch.tensor([3.0, 4.0])
    assert svi.step(data, shift=1.0) == pytest.approx(_loss_by_hand(0.2, data, 1.0), rel=1e-6)


def test_evaluate_loss_leaves_params_alone():
    svi = SVI(model, guide, SGD({"lr": 0.1}), Trace_ELBO())
    svi.step()
    before = pyro.param("mu_map").item()
    value = svi.evaluate_loss()
    assert isinstance(value, float)
    assert value == pytest.approx(_loss_by_hand(before), rel=1e-6)
    assert pyro.param("mu_map").item() == before
    raw = dict(pyro.get_param_store().named_parameters())["mu_map"]
    assert raw.grad is None or not raw.grad.any()


def test_elbo_loss_and_differentiable_loss_agree():
    elbo = Trace_ELBO()
    pyro.param("mu_map", torch.tensor(0.2))
    value = elbo.loss(model, guide)
    assert isinstance(value, float) and value == pytest.approx(_loss_by_hand(0.2), rel=1e-6)
    diff = elbo.differentiable_loss(model, guide)
    assert diff.requires_grad and diff.item() == pytest.approx(value, rel=1e-6)
    lg = elbo.loss_and_grads(model, guide)
    assert float(lg) == pytest.approx(value, rel=1e-6)
    raw = dict(pyro.get_param_store().named_parameters())["mu_map"]
    assert raw.grad.item() == pytest.approx(0.2 - (DATA - 0.2).sum().item(), rel=1e-6)


def test_num_particles_averages():
    pyro.param("mu_map", torch.tensor(0.2))
    one = Trace_ELBO().loss(model, guide)
    three = Trace_ELBO(num_particles=3).loss(model, guide)
    assert three == pytest.approx(one, rel=1e-6)  # a Delta guide: every particle is the same


def test_loss_as_a_callable():
    """Pyro accepts any ``loss(model, guide, *args)`` returning a differentiable tensor."""
    svi = SVI(model, guide, SGD({"lr": 0.1}), Trace_ELBO().differentiable_loss)
    loss = svi.step()
    assert loss == pytest.approx(_loss_by_hand(0.2), rel=1e-6)
    grad = 0.2 - (DATA - 0.2).sum().item()
    assert pyro.param("mu_map").item() == pytest.approx(0.2 - 0.1 * grad, rel=1e-6)


def test_custom_loss_and_grads():
    calls = []

    def loss_and_grads(model_, guide_, *args, **kwargs):
        calls.append((model_, guide_, args, kwargs))
        return Trace_ELBO().loss_and_grads(model_, guide_, *args, **kwargs)

    # (Pyro uses a custom loss_and_grads when the loss is a plain callable, as here)
    elbo = Trace_ELBO()
    svi = SVI(model, guide, SGD({"lr": 0.1}), elbo.differentiable_loss, loss_and_grads)
    svi.step(DATA, shift=0.0)
    assert calls and calls[0][0] is model and calls[0][1] is guide
    assert calls[0][2] == (DATA,) and calls[0][3] == {"shift": 0.0}


def test_torch_optimizer_class_is_refused():
    with pytest.raises((ValueError, TypeError)):
        SVI(model, guide, torch.optim.Adam, Trace_ELBO()).step()


def test_grad_hook_sees_named_unconstrained_params_and_can_skip():
    seen = {}

    def hook(loss, params):
        seen.update(params)
        assert torch.is_tensor(loss) and loss.dim() == 0
        for p in params.values():
            assert p.grad is not None
        # returning None skips the optimizer step

    def g(data=DATA, shift=0.0):
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), s))

    svi = SVI(model, g, Adam({"lr": 0.5}), Trace_ELBO(), grad_hook=hook)
    svi.step()
    assert set(seen) == {"s", "loc"}
    raw = dict(pyro.get_param_store().named_parameters())
    assert seen["s"] is raw["s"] and seen["loc"] is raw["loc"]
    assert pyro.param("loc").item() == 0.0 and pyro.param("s").item() == pytest.approx(1.0)
    svi.grad_hook = lambda loss, params: loss
    svi.step()
    assert pyro.param("loc").item() != 0.0


def test_mean_field_elbo_value_for_normal_guide():
    """KL(q||p) analytic + E_q[log lik] via the one draw: check against torch."""

    def g(data=DATA, shift=0.0):
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.3)), 0.5))

    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    value = TraceMeanField_ELBO().loss(model, g)
    torch.manual_seed(0)
    mu = torch.distributions.Normal(0.3, 0.5).rsample()
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(0.3, 0.5), torch.distributions.Normal(0.0, 1.0)
    )
    want = kl - torch.distributions.Normal(mu, 1.0).log_prob(DATA).sum()
    assert value == pytest.approx(want.item(), rel=1e-5)
    assert math.isfinite(value)


def test_step_without_any_param():
    """Pyro: a model and guide with no params still step (there is nothing to update)."""

    def m():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def g():
        pyro.sample("z", dist.Normal(1.0, 1.0))

    svi = SVI(m, g, Adam({"lr": 0.1}), Trace_ELBO())
    assert math.isfinite(svi.step())
    assert math.isfinite(svi.evaluate_loss())


def test_a_failing_step_leaves_no_state_behind():
    """An exception inside plates and handlers must not leak handlers or plate dims."""
    calls = {"n": 0}

    def m(data=DATA):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("outer", 2, dim=-2), pyro.plate("data", len(data)):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("user code failed")
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    svi = SVI(m, guide, SGD({"lr": 0.1}), Trace_ELBO())
    with pytest.raises(RuntimeError, match="user code failed"):
        svi.step()
    from distsvi.poutine.runtime import am_i_wrapped

    assert not am_i_wrapped()
    assert math.isfinite(svi.step())
    with pyro.plate("fresh", 3) as idx:  # dim -1 is free again
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
    assert x.shape == (3,) and len(idx) == 3


# Validation after the first step: arguments unchecked, values checked, errors on time ----
def _scale_model(y):
    pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def _scale_guide(y):
    loc = pyro.param("v_loc", torch.tensor(0.0))
    scale = pyro.param("v_scale", torch.tensor(1.0))  # unconstrained: may go invalid
    pyro.sample("x", dist.Normal(loc, scale), infer={"is_auxiliary": True})


def test_an_invalid_param_raises_before_the_step_that_would_use_it_moves_anything():
    pyro.clear_param_store()
    svi = SVI(_scale_model, _scale_guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        svi.step(torch.tensor(0.5))
    store = pyro.get_param_store()
    with torch.no_grad():
        store._params["v_scale"].fill_(-1.0)  # in place: the store's version does not move
    loc = store["v_loc"].detach().clone()
    with pytest.raises(ValueError, match="scale"):
        svi.step(torch.tensor(0.5))
    assert float(store["v_scale"].detach()) == -1.0
    assert torch.equal(store["v_loc"].detach(), loc)
    pyro.clear_param_store()


def test_observed_values_are_checked_at_every_step():
    def model(y):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(p), obs=y)

    def guide(y):
        a = pyro.param("a", torch.tensor(2.0), constraint=torch.distributions.constraints.positive)
        pyro.sample("p", dist.Beta(a, 2.0))

    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(5):
        svi.step(torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="site 'y'"):
        svi.step(torch.tensor([0.0, 2.0, 1.0]))  # a label outside {0, 1}
    pyro.clear_param_store()


def test_a_distribution_built_without_validation_stays_unchecked():
    def model(y):  # a continuous "Bernoulli" likelihood, as in Pyro's VAE example
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(p, validate_args=False), obs=y)

    def guide(y):
        a = pyro.param("a", torch.tensor(2.0), constraint=torch.distributions.constraints.positive)
        pyro.sample("p", dist.Beta(a, 2.0))

    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(torch.tensor([0.2, 0.7, 0.9])) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    pyro.clear_param_store()

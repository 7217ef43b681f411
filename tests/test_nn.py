"""distsvi.nn: PyroModule attributes become param/sample sites named by their path."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import distsvi
import distsvi.distributions as dist
from distsvi import poutine
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO
from distsvi.nn import PyroModule, PyroParam, PyroSample, clear, pyro_method


class Regression(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = PyroModule[nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.sigma = PyroParam(torch.tensor(0.5), constraint=constraints.positive)
        self.shift = PyroSample(lambda self: dist.Normal(self.sigma, 1.0))

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1) + self.shift
        with distsvi.plate("data", x.shape[0]):
            return distsvi.sample("obs", dist.Normal(mean, self.sigma), obs=y)


def sites(fn, *args):
    tr = poutine.trace(fn).get_trace(*args)
    return {n: s["type"] for n, s in tr.nodes.items() if s["type"] in ("sample", "param")}


def test_mixin_class_is_both_and_cached():
    cls = PyroModule[nn.Linear]
    assert issubclass(cls, nn.Linear) and issubclass(cls, PyroModule)
    assert PyroModule[nn.Linear] is cls and cls.__name__ == "PyroLinear"
    assert PyroModule[cls] is cls and PyroModule[nn.Module] is PyroModule
    with pytest.raises(TypeError, match="nn.Module class"):
        PyroModule[int]


def test_attributes_become_sites_named_by_path():
    m = Regression()
    x = torch.randn(4, 3)
    assert sites(m, x) == {
        "linear.weight": "sample",
        "linear.bias": "param",
        "sigma": "param",
        "shift": "sample",
        "obs": "sample",
    }
    assert sorted(distsvi.get_param_store().keys()) == ["linear.bias", "sigma"]


def test_nested_modules_and_plain_children():
    class Inner(PyroModule):
        def __init__(self):
            super().__init__()
            self.z = PyroSample(dist.Normal(0.0, 1.0))
            self.net = nn.Linear(2, 2)  # a plain module: registered with distsvi.module

        def forward(self):
            return self.z + self.net(torch.ones(2)).sum()

    class Outer(PyroModule):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self):
            return self.inner()

    assert sites(Outer()) == {
        "inner.z": "sample",
        "inner.net$$$weight": "param",
        "inner.net$$$bias": "param",
    }


def test_sample_is_drawn_once_per_call_and_fresh_outside():
    class Twice(PyroModule):
        def __init__(self):
            super().__init__()
            self.z = PyroSample(dist.Normal(0.0, 1.0))

        def forward(self):
            return self.z, self.z

        @pyro_method
        def read(self):
            return self.z - self.z

    m = Twice()
    a, b = m()
    assert a is b
    assert sites(m) == {"z": "sample"}
    assert m.read() == 0
    assert m.z != m.z  # outside a call: a fresh draw each read, no site


def test_param_is_the_store_tensor_and_svi_trains_the_module():
    m = Regression()
    x, y = torch.randn(20, 3), torch.randn(20)

    def guide(x, y=None):
        loc = distsvi.param("w_loc", torch.zeros(1, 3))
        distsvi.sample("linear.weight", dist.Normal(loc, 0.1).to_event(2))
        distsvi.sample("shift", dist.Normal(0.0, 0.1))

    svi = SVI(m, guide, distsvi.optim.Adam({"lr": 0.1}), Trace_ELBO())
    before = m.sigma.detach().clone()
    svi.step(x, y)
    store = distsvi.get_param_store()
    assert store._params["sigma"] is m.sigma_unconstrained
    assert store._params["linear.bias"] is m.linear.bias
    assert m.sigma != before
    torch.testing.assert_close(store["sigma"], m.sigma)


def test_store_value_wins_over_the_module_init():
    distsvi.param("sigma", torch.tensor(3.0), constraint=constraints.positive)
    m = Regression()
    m(torch.randn(2, 3))
    torch.testing.assert_close(m.sigma, torch.tensor(3.0))


def test_outside_a_call_params_read_constrained_without_sites():
    m = Regression()
    assert m.sigma.item() == pytest.approx(0.5)
    assert len(distsvi.get_param_store()) == 0
    m.sigma = torch.tensor(2.0)  # a tensor sets the constrained value
    assert m.sigma.item() == pytest.approx(2.0)
    assert [n for n, _ in m.named_pyro_params()] == ["sigma", "linear.bias"]


def test_delete_and_clear_remove_from_the_store():
    m = Regression()
    m(torch.randn(2, 3))
    del m.sigma
    assert "sigma" not in distsvi.get_param_store()
    clear(m)
    assert len(distsvi.get_param_store()) == 0
    assert list(m.parameters()) == []


def test_module_local_params_keep_the_global_store_empty():
    x, y = torch.randn(20, 3), torch.randn(20)

    class Guide(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.zeros(1, 3))
            self.scale = PyroParam(torch.full((1, 3), 0.1), constraint=constraints.positive)

        def forward(self, x, y=None):
            distsvi.sample("linear.weight", dist.Normal(self.loc, self.scale).to_event(2))
            distsvi.sample("shift", dist.Normal(0.0, 0.1))

    with distsvi.settings.context(module_local_params=True):
        m, g = Regression(), Guide()
        svi = SVI(m, g, distsvi.optim.Adam({"lr": 0.1}), Trace_ELBO())
        before = [p.detach().clone() for p in g.parameters()]
        svi.step(x, y)
        assert sites(m, x)["sigma"] == "param"
    assert distsvi.settings.get("module_local_params") is False
    assert len(distsvi.get_param_store()) == 0
    assert all(not torch.equal(a, b) for a, b in zip(before, g.parameters()))


def test_mixin_instances_pickle_and_copy():
    m = Regression()
    m.shift = PyroSample(dist.Normal(0.0, 1.0))  # a lambda does not pickle (in Pyro neither)
    m(torch.randn(2, 3))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.linear) is PyroModule[nn.Linear]
    torch.testing.assert_close(loaded.sigma, m.sigma)
    assert type(copy.deepcopy(m).linear) is PyroModule[nn.Linear]
    fresh = Regression()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.sigma, m.sigma)


def test_pyro_sample_refuses_a_non_prior():
    with pytest.raises(TypeError, match="distribution or a function"):
        PyroSample(3.0)


def test_settings_get_set_context():
    assert distsvi.settings.get()["module_local_params"] is False
    with pytest.raises(KeyError, match="unknown setting 'nope'"):
        distsvi.settings.get("nope")
    with pytest.raises(TypeError, match="True or False"):
        distsvi.settings.set(module_local_params=1)

    @distsvi.settings.context(module_local_params=True)
    def inside():
        return distsvi.settings.get("module_local_params")

    assert inside() is True
    assert distsvi.settings.get("module_local_params") is False

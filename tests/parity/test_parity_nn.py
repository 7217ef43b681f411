"""PyroModule parity with Pyro 1.9.2: Pyro's Bayesian-regression and Bayesian-neural-network
tutorial models, with PyroModule guides, give the same losses, gradients and trajectories.

Draws are equal because both engines draw the same torch random numbers in the same order
from the same seed (the guides are reparameterised Normals: ``loc + scale * eps``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

pytest.importorskip("pyro")

from parity_harness import assert_close, assert_same_params, backend, isolated

_g = torch.Generator().manual_seed(7)
X = torch.randn(30, 3, generator=_g, dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
    30, generator=_g, dtype=torch.float64
)
X1 = torch.linspace(-2, 2, 30, dtype=torch.float64)
Y1 = torch.sin(2 * X1) + 0.1 * torch.randn(30, generator=_g, dtype=torch.float64)


def with_nn(name: str):
    B = backend(name)
    B.nn = importlib.import_module(f"{name}.nn")
    return B


def regression(B):
    """The Bayesian-regression tutorial's model, as written there."""
    PyroModule, PyroSample, dist, pyro = B.nn.PyroModule, B.nn.PyroSample, B.dist, B.pyro

    class BayesianRegression(PyroModule):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.linear = PyroModule[nn.Linear](in_features, out_features)
            self.linear.weight = PyroSample(
                dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
            )
            self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

        def forward(self, x, y=None):
            sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
            mean = self.linear(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
            return mean

    return BayesianRegression(3, 1)


def bnn(B):
    """The Bayesian-neural-network tutorial's model (one hidden tanh layer)."""
    PyroModule, PyroSample, dist, pyro = B.nn.PyroModule, B.nn.PyroSample, B.dist, B.pyro

    class BNN(PyroModule):
        def __init__(self, in_dim=1, out_dim=1, hid_dim=5, prior_scale=10.0):
            super().__init__()
            self.activation = nn.Tanh()
            self.layer1 = PyroModule[nn.Linear](in_dim, hid_dim)
            self.layer2 = PyroModule[nn.Linear](hid_dim, out_dim)
            self.layer1.weight = PyroSample(
                dist.Normal(0.0, prior_scale).expand([hid_dim, in_dim]).to_event(2)
            )
            self.layer1.bias = PyroSample(
                dist.Normal(0.0, prior_scale).expand([hid_dim]).to_event(1)
            )
            self.layer2.weight = PyroSample(
                dist.Normal(0.0, prior_scale).expand([out_dim, hid_dim]).to_event(2)
            )
            self.layer2.bias = PyroSample(
                dist.Normal(0.0, prior_scale).expand([out_dim]).to_event(1)
            )

        def forward(self, x, y=None):
            x = x.reshape(-1, 1)
            x = self.activation(self.layer1(x))
            mu = self.layer2(x).squeeze()
            sigma = pyro.sample("sigma", dist.Gamma(0.5, 1))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu, sigma * sigma), obs=y)
            return mu

    return BNN()


def mean_field_guide(B, shapes: dict, positive: tuple = (), extras: bool = True):
    """A PyroModule guide: a Normal (a LogNormal for ``positive`` sites) per site, with
    PyroParam locs and positive scales, and (``extras``) an nn.Parameter and a plain child
    module shifting every loc."""
    PyroModule, PyroParam, dist, pyro = B.nn.PyroModule, B.nn.PyroParam, B.dist, B.pyro
    positive_c = B.constraints.positive

    class Guide(PyroModule):
        def __init__(self):
            super().__init__()
            if extras:
                self.shift = nn.Parameter(torch.zeros(()))
                self.net = nn.Linear(1, 1)
            for i, (site, shape) in enumerate(shapes.items()):
                init = torch.linspace(-0.5, 0.5, max(1, torch.Size(shape).numel())).reshape(shape)
                setattr(self, f"loc{i}", PyroParam(init + 0.1 * i))
                setattr(self, f"scale{i}", PyroParam(0.1 + 0.01 * i + init.abs(), positive_c))

        def forward(self, *args, **kwargs):
            bump = self.shift + self.net(torch.ones(1)).sum() if extras else 0.0
            for i, (site, shape) in enumerate(shapes.items()):
                loc, scale = getattr(self, f"loc{i}") + bump, getattr(self, f"scale{i}")
                d = dist.LogNormal(loc, scale) if site in positive else dist.Normal(loc, scale)
                pyro.sample(site, d.to_event(len(shape)))

    return Guide()


CASES = {
    "regression": (
        regression,
        {"linear.weight": (1, 3), "linear.bias": (1,), "sigma": ()},
        ("sigma",),
        (X, Y),
    ),
    "bnn": (
        bnn,
        {
            "layer1.weight": (5, 1),
            "layer1.bias": (5,),
            "layer2.weight": (1, 5),
            "layer2.bias": (1,),
            "sigma": (),
        },
        ("sigma",),
        (X1, Y1),
    ),
}


def run(name: str, case: str, steps: int, local: bool = False):
    B = with_nn(name)
    make_model, shapes, positive, data = CASES[case]
    B.pyro.clear_param_store()
    with B.pyro.settings.context(module_local_params=local), isolated(B):
        torch.manual_seed(0)
        # Pyro's SVI cannot step an nn.Parameter attribute in local mode: PyroParams only.
        model, guide = make_model(B), mean_field_guide(B, shapes, positive, extras=not local)
        if case == "regression":
            # the sigma site's support is (0, 10): keep its guide inside
            guide.loc2 = torch.tensor(0.0)
        elbo = B.infer.Trace_ELBO()
        loss = elbo.loss_and_grads(model, guide, *data)
        params = (
            dict(guide.named_parameters())
            if local
            else dict(B.pyro.get_param_store().named_parameters())
        )
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        svi = B.infer.SVI(model, guide, B.optim.Adam({"lr": 0.05}), elbo)
        losses = [svi.step(*data) for _ in range(steps)]
        values = {n: p.detach().clone() for n, p in params.items()}
        store_size = len(B.pyro.get_param_store())
    B.pyro.clear_param_store()
    return float(loss), grads, losses, values, store_size


@pytest.mark.parametrize("case", list(CASES))
def test_tutorial_models_loss_grads_and_trajectory(case):
    want = run("pyro", case, steps=10)
    got = run("distsvi", case, steps=10)
    assert_close(got[0], want[0], f"{case}: first loss")
    assert_same_params(got[1], want[1], f"{case}: gradient")
    assert_close(got[2], want[2], f"{case}: losses over 10 Adam steps")
    assert_same_params(got[3], want[3], f"{case}: params after 10 steps")


def test_module_local_params_match_pyro_and_leave_the_store_empty():
    want = run("pyro", "bnn", steps=5, local=True)
    got = run("distsvi", "bnn", steps=5, local=True)
    assert got[4] == want[4] == 0
    assert_close(got[0], want[0], "local params: first loss")
    assert_same_params(got[1], want[1], "local params: gradient")
    assert_close(got[2], want[2], "local params: losses")
    assert_same_params(got[3], want[3], "local params: params after 5 steps")

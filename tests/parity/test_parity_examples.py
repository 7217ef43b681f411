"""Pyro's SVI example programs, with only their imports changed, under Pyro 1.9.2 and distsvi.

Each program below is written once against a backend's modules (``pyro``, ``dist``,
``SVI``, ...) as the example script imports them, and run under both engines from the same
seed with shortened loops. Nothing makes the draws equal but the seed: both engines must
draw the same torch random numbers in the same order, so matching losses also show that
distsvi consumes the generator exactly as Pyro does (guide init, sampling, data loaders).

The programs: ``examples/eight_schools/svi.py`` (plain and ``--jit``),
``examples/svi_horovod.py`` with ``--no-horovod``, and the Bayesian-regression tutorial's
model with an ``AutoDiagonalNormal`` guide (synthetic data of the rugged dataset's shape:
170 rows, three features).
"""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch
from torch import nn

pytest.importorskip("pyro")

from parity_harness import isolated

RTOL = 1e-4


def imports(name: str) -> types.SimpleNamespace:
    """What the example scripts import, from ``name`` (``pyro`` or ``distsvi``)."""
    infer = importlib.import_module(f"{name}.infer")
    autoguide = importlib.import_module(f"{name}.infer.autoguide")
    optim = importlib.import_module(f"{name}.optim")
    pnn = importlib.import_module(f"{name}.nn")
    return types.SimpleNamespace(
        name=name,
        pyro=importlib.import_module(name),
        dist=importlib.import_module(f"{name}.distributions"),
        SVI=infer.SVI,
        Trace_ELBO=infer.Trace_ELBO,
        JitTrace_ELBO=infer.JitTrace_ELBO,
        AutoNormal=autoguide.AutoNormal,
        AutoDiagonalNormal=autoguide.AutoDiagonalNormal,
        PyroModule=pnn.PyroModule,
        PyroSample=pnn.PyroSample,
        Adam=optim.Adam,
        HorovodOptimizer=optim.HorovodOptimizer,
    )


def assert_losses_match(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, float), f"{what}: step {i} returned {type(g).__name__}, not float"
        assert abs(g - w) <= RTOL * abs(w) + 1e-9, f"{what}: step {i}: distsvi {g!r}, Pyro {w!r}"


# ---------------------------------------------------------------- eight schools (svi.py)


def eight_schools(name: str, jit: bool, num_epochs: int, lr: float = 0.01):
    m = imports(name)
    pyro, dist, constraints = m.pyro, m.dist, m.dist.constraints
    from torch.distributions import transforms

    J = 8
    y = torch.tensor([28, 8, -3, 7, -1, 1, 18, 12]).type(torch.Tensor)
    sigma = torch.tensor([15, 10, 16, 11, 9, 11, 10, 18]).type(torch.Tensor)
    data = torch.stack([y, sigma], dim=1)

    def model(data):
        y = data[:, 0]
        sigma = data[:, 1]
        with pyro.plate("data", J):
            eta = pyro.sample("eta", dist.Normal(torch.zeros(J), torch.ones(J)))
            mu = pyro.sample("mu", dist.Normal(torch.zeros(1), 10 * torch.ones(1)))
            tau = pyro.sample("tau", dist.HalfCauchy(scale=25 * torch.ones(1)))
            theta = mu + tau * eta
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    def guide(data):
        loc_eta = torch.randn(J)
        scale_eta = 0.1 * torch.rand(J)
        loc_mu = torch.randn(1)
        scale_mu = 0.1 * torch.rand(1)
        loc_logtau = torch.randn(1)
        scale_logtau = 0.1 * torch.rand(1)
        m_eta_param = pyro.param("loc_eta", loc_eta)
        s_eta_param = pyro.param("scale_eta", scale_eta, constraint=constraints.positive)
        m_mu_param = pyro.param("loc_mu", loc_mu)
        s_mu_param = pyro.param("scale_mu", scale_mu, constraint=constraints.positive)
        m_logtau_param = pyro.param("loc_logtau", loc_logtau)
        s_logtau_param = pyro.param("scale_logtau", scale_logtau, constraint=constraints.positive)
        dist_eta = dist.Normal(m_eta_param, s_eta_param)
        dist_mu = dist.Normal(m_mu_param, s_mu_param)
        dist_tau = dist.TransformedDistribution(
            dist.Normal(m_logtau_param, s_logtau_param),
            transforms=transforms.ExpTransform(),
        )
        with pyro.plate("data", J):
            pyro.sample("eta", dist_eta)
            pyro.sample("mu", dist_mu)
            pyro.sample("tau", dist_tau)

    optim = m.Adam({"lr": lr})
    elbo = m.JitTrace_ELBO() if jit else m.Trace_ELBO()
    svi = m.SVI(model, guide, optim, loss=elbo)
    pyro.clear_param_store()
    losses = [svi.step(data) for _ in range(num_epochs)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    return losses, params


def test_eight_schools_svi_losses_match_pyro():
    runs = {}
    for name in ("pyro", "distsvi"):
        with isolated(imports(name)):
            torch.manual_seed(0)
            runs[name] = eight_schools(name, jit=False, num_epochs=60)
    (got, got_params), (want, want_params) = runs["distsvi"], runs["pyro"]
    assert_losses_match(got, want, "eight schools")
    assert sorted(got_params) == sorted(want_params)
    for k in want_params:
        torch.testing.assert_close(got_params[k], want_params[k], rtol=RTOL, atol=1e-6, msg=k)


def test_eight_schools_svi_jit_runs_and_its_first_step_is_pyros_eager_step():
    """``--jit``: distsvi runs JitTrace_ELBO as SVI(compile=True). Its first step is eager and
    equals Trace_ELBO's; later compiled steps draw other random numbers than Pyro's JIT
    (which also runs the program twice on its first step), so only the fit is compared."""
    runs = {}
    for name, jit in (("pyro", False), ("pyro", True), ("distsvi", True)):
        with isolated(imports(name)):
            torch.manual_seed(0)
            runs[name, jit] = eight_schools(name, jit=jit, num_epochs=200, lr=0.05)
    got, got_params = runs["distsvi", True]
    assert all(isinstance(x, float) and math.isfinite(x) for x in got)
    assert_losses_match(got[:1], runs["pyro", False][0][:1], "eight schools --jit, first step")
    want_params = runs["pyro", True][1]
    assert sorted(got_params) == sorted(want_params)
    for k in want_params:  # 200 noisy steps of lr 0.05 from the same start: the same region
        torch.testing.assert_close(got_params[k], want_params[k], rtol=0, atol=1.0, msg=k)


# ---------------------------------------------------------------- svi_horovod.py --no-horovod


def svi_horovod(name: str, size: int, batch_size: int, num_epochs: int, seed=20200723):
    m = imports(name)
    pyro, dist = m.pyro, m.dist
    horovod = False  # --no-horovod: the distributed parts of the script never run

    class Model(m.PyroModule):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, covariates, data=None):
            coeff = pyro.sample("coeff", dist.Normal(0, 1))
            bias = pyro.sample("bias", dist.Normal(0, 1))
            scale = pyro.sample("scale", dist.LogNormal(0, 1))
            with pyro.plate("data", self.size, len(covariates)):
                loc = bias + coeff * covariates
                return pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    pyro.set_rng_seed(seed)
    model = Model(size)
    covariates = torch.randn(size)
    data = model(covariates)
    guide = m.AutoNormal(model)
    elbo = m.Trace_ELBO()
    optim = m.Adam({"lr": 0.01})
    if horovod:
        optim = m.HorovodOptimizer(optim)
    dataset = torch.utils.data.TensorDataset(covariates, data)
    sampler = torch.utils.data.RandomSampler(dataset)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    svi = m.SVI(model, guide, optim, elbo)
    losses = []
    for epoch in range(num_epochs):
        for step, (covariates_batch, data_batch) in enumerate(dataloader):
            losses.append(svi.step(covariates_batch, data_batch))
    quantiles = guide.quantiles([0.25, 0.5, 0.75])
    pyro.clear_param_store()
    return losses, {k: v.detach() for k, v in quantiles.items()}


def test_svi_horovod_without_horovod_matches_pyro():
    runs = {}
    for name in ("pyro", "distsvi"):
        with isolated(imports(name)):
            runs[name] = svi_horovod(name, size=2000, batch_size=100, num_epochs=3)
    (got, got_q), (want, want_q) = runs["distsvi"], runs["pyro"]
    assert len(want) == 60
    assert_losses_match(got, want, "svi_horovod")
    assert sorted(got_q) == sorted(want_q)
    for k in want_q:
        torch.testing.assert_close(got_q[k], want_q[k], rtol=RTOL, atol=1e-6, msg=k)


def test_horovod_optimizer_is_importable_and_refuses_with_a_pointer_to_torchrun():
    m = imports("distsvi")
    with pytest.raises(NotImplementedError, match="torchrun"):
        m.HorovodOptimizer(m.Adam({"lr": 0.01}))


# ---------------------------------------------------------------- Bayesian regression tutorial


def rugged_like(n=170):
    """The tutorial's design matrix (cont_africa, rugged, their product) and log GDP."""
    g = torch.Generator().manual_seed(3)
    africa = (torch.rand(n, generator=g) < 0.3).double()
    rugged = 3.0 * torch.rand(n, generator=g) ** 2
    x = torch.stack([africa, rugged, africa * rugged], dim=1)
    noise = 0.9 * torch.randn(n, generator=g)
    y = 9.2 - 1.9 * africa - 0.2 * rugged + 0.35 * africa * rugged + noise
    return x, y


def bayesian_regression(name: str, x_data, y_data, num_iterations: int):
    m = imports(name)
    pyro, dist, PyroModule, PyroSample = m.pyro, m.dist, m.PyroModule, m.PyroSample
    pyro.set_rng_seed(1)

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

    model = BayesianRegression(3, 1)
    guide = m.AutoDiagonalNormal(model)
    adam = pyro.optim.Adam({"lr": 0.03})
    svi = m.SVI(model, guide, adam, loss=m.Trace_ELBO())
    pyro.clear_param_store()
    losses = [svi.step(x_data, y_data) for _ in range(num_iterations)]
    guide.requires_grad_(False)
    params = {name: pyro.param(name).detach().clone() for name in pyro.get_param_store()}
    frozen = [p.requires_grad for _, p in pyro.get_param_store().named_parameters()]
    quantiles = guide.quantiles([0.25, 0.5, 0.75])
    pyro.clear_param_store()
    return losses, params, quantiles, frozen


def test_bayesian_regression_tutorial_matches_pyro():
    x, y = rugged_like()
    runs = {}
    for name in ("pyro", "distsvi"):
        with isolated(imports(name)):
            runs[name] = bayesian_regression(name, x, y, num_iterations=150)
    (got, got_p, got_q, got_f), (want, want_p, want_q, want_f) = runs["distsvi"], runs["pyro"]
    assert_losses_match(got, want, "Bayesian regression")
    assert sorted(got_p) == sorted(want_p) == ["AutoDiagonalNormal.loc", "AutoDiagonalNormal.scale"]
    for k in want_p:
        torch.testing.assert_close(got_p[k], want_p[k], rtol=RTOL, atol=1e-6, msg=k)
    assert got_f == want_f
    assert sorted(got_q) == sorted(want_q)
    for k in want_q:
        torch.testing.assert_close(got_q[k], want_q[k], rtol=RTOL, atol=1e-6, msg=k)

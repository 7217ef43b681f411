"""Loss, gradient and trajectory parity with Pyro 1.9.2 on a set of small models.

Each case is written once as ``model(B, ...)``/``guide(B, ...)`` against a backend ``B``
(``B.pyro``, ``B.dist``, ``B.poutine``, ...) and run under both engines with the same
explicit subsample indices and the same guide draws (see ``parity_harness``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import (
    assert_close,
    assert_same_params,
    bind,
    both,
    fixed,
    fixed_lognormal,
    fixed_normal,
    fixed_value,
    isolated,
    loss_and_grads,
    train,
)

D = torch.float64
_g = torch.Generator().manual_seed(1234)


def _randn(*shape):
    return torch.randn(*shape, generator=_g, dtype=D)


N = 20
X = _randn(N, 3)
TRUE_W = torch.tensor([1.0, -2.0, 0.5], dtype=D)
Y_LOGIT = (torch.rand(N, generator=_g, dtype=D) < torch.sigmoid(X @ TRUE_W)).to(D)
Y_NORMAL = 1.5 + _randn(N)
IDX = torch.tensor([3, 17, 0, 8, 11, 5, 19])
EPS = _randn(64)  # pre-drawn guide noise, sliced per site


def eps(lo, *shape):
    n = 1
    for s in shape:
        n *= s
    return EPS[lo : lo + n].reshape(shape)


# --------------------------------------------------------------------------------- models


def conjugate_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 10.0))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("obs", B.dist.Normal(mu, 1.0), obs=x)


def conjugate_guide(B, x):
    loc = B.pyro.param("loc", torch.tensor(0.3))
    scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(0)))


def logreg_model(B, x, y, idx):
    w = B.pyro.sample("w", B.dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1))
    b = B.pyro.sample("b", B.dist.Normal(0.0, 5.0))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        B.pyro.sample("y", B.dist.Bernoulli(logits=x[ind] @ w + b), obs=y[ind])


def logreg_guide(B, x, y, idx):
    w_loc = B.pyro.param("w_loc", torch.tensor([0.1, -0.2, 0.3]))
    w_scale = B.pyro.param("w_scale", torch.full((3,), 0.5), constraint=B.constraints.positive)
    B.pyro.sample("w", fixed_normal(B, w_loc, w_scale, eps(1, 3)).to_event(1))
    b_loc = B.pyro.param("b_loc", torch.tensor(0.0))
    b_scale = B.pyro.param("b_scale", torch.tensor(0.3), constraint=B.constraints.positive)
    B.pyro.sample("b", fixed_normal(B, b_loc, b_scale, eps(4)))


G, M = 5, 4
HIER_DATA = _randn(M, G) + torch.arange(G, dtype=D)
GIDX = torch.tensor([4, 1, 2])


def hier_model(B, data, gidx):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 5.0))
    sigma = B.pyro.sample("sigma", B.dist.LogNormal(0.0, 1.0))
    with B.pyro.plate("groups", G, subsample=gidx, dim=-1):
        theta = B.pyro.sample("theta", B.dist.Normal(mu, sigma))
        with B.pyro.plate("obs", M, dim=-2):
            B.pyro.sample("x", B.dist.Normal(theta, 1.0), obs=data[:, gidx])


def hier_guide(B, data, gidx):
    mu_loc = B.pyro.param("mu_loc", torch.tensor(0.5))
    mu_scale = B.pyro.param("mu_scale", torch.tensor(0.4), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, mu_loc, mu_scale, eps(5)))
    s_loc = B.pyro.param("s_loc", torch.tensor(0.1))
    s_scale = B.pyro.param("s_scale", torch.tensor(0.2), constraint=B.constraints.positive)
    B.pyro.sample("sigma", fixed_lognormal(B, s_loc, s_scale, eps(6)))
    t_loc = B.pyro.param("t_loc", torch.linspace(0.0, 1.0, G))
    t_scale = B.pyro.param("t_scale", torch.full((G,), 0.3), constraint=B.constraints.positive)
    with B.pyro.plate("groups", G, subsample=gidx, dim=-1) as ind:
        B.pyro.sample("theta", fixed_normal(B, t_loc[ind], t_scale[ind], eps(10, G)[ind]))


MASK = torch.arange(N) % 3 != 0


def scale_mask_model(B, x, m):
    with B.poutine.scale(scale=0.5):  # a KL-annealing style weight on the latent
        mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.poutine.scale(scale=0.3):
        B.pyro.sample("aux", B.dist.Normal(mu, 2.0), obs=x[0])
    with B.pyro.plate("data", len(x)):
        with B.poutine.mask(mask=m):
            B.pyro.sample("obs", B.dist.Normal(mu, 1.0), obs=x)
        B.pyro.sample("obs2", B.dist.Normal(mu, 2.0).mask(~m), obs=0.5 * x)
        with B.poutine.scale(scale=2.0), B.poutine.mask(mask=m.flip(0)):
            B.pyro.sample("obs3", B.dist.Normal(2.0 * mu, 1.5), obs=x)


def scale_mask_guide(B, x, m):
    loc = B.pyro.param("loc", torch.tensor(0.2))
    scale = B.pyro.param("scale", torch.tensor(0.5), constraint=B.constraints.positive)
    with B.poutine.scale(scale=0.5):
        B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(20)))


K = 3
CATS = torch.tensor([0, 1, 2, 2, 1, 0, 2, 2, 1, 2, 0, 0, 1, 2, 2, 1, 1, 0, 2, 2])
Y2 = _randn(N, 2) @ torch.tensor([[1.0, 0.5], [0.0, 0.7]], dtype=D)
BITS = (torch.arange(N) % 4 == 1).to(D)


def constrained_model(B, x, c, y2, bits):
    sigma = B.pyro.param("sigma", torch.tensor(1.3), constraint=B.constraints.positive)
    probs = B.pyro.param("probs", torch.tensor([0.2, 0.3, 0.5]), constraint=B.constraints.simplex)
    tril = B.pyro.param(
        "tril",
        torch.tensor([[1.0, 0.0], [0.3, 0.8]]),
        constraint=B.constraints.lower_cholesky,
    )
    nu = B.pyro.param("nu", torch.tensor(0.4), constraint=B.constraints.interval(0.0, 1.0))
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 2.0))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("x", B.dist.Normal(mu, sigma), obs=x)
        B.pyro.sample("c", B.dist.Categorical(probs), obs=c)
        B.pyro.sample("y2", B.dist.MultivariateNormal(mu.expand(2), scale_tril=tril), obs=y2)
        B.pyro.sample("bits", B.dist.Bernoulli(nu), obs=bits)


def constrained_guide(B, x, c, y2, bits):
    loc = B.pyro.param("loc", torch.tensor(0.0))
    scale = B.pyro.param("scale", torch.tensor(0.5), constraint=B.constraints.interval(0.01, 2.0))
    B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(21)))


X3 = _randn(N, 3) + torch.tensor([1.0, 0.0, -1.0], dtype=D)


def to_event_model(B, x):
    loc = B.pyro.sample("loc", B.dist.Normal(torch.zeros(3), 2.0).to_event(1))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("x", B.dist.Normal(loc, 0.7).to_event(1), obs=x)


def to_event_guide(B, x):
    q_loc = B.pyro.param("q_loc", torch.zeros(3))
    q_scale = B.pyro.param("q_scale", torch.ones(3) * 0.4, constraint=B.constraints.positive)
    B.pyro.sample("loc", fixed_normal(B, q_loc, q_scale, eps(22, 3)).to_event(1))


def meanfield_model(B, x, idx):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    tau = B.pyro.sample("tau", B.dist.Gamma(2.0, 2.0))  # no analytic KL with a LogNormal guide
    w = B.pyro.sample("w", B.dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        z = B.pyro.sample("z", B.dist.Normal(mu + w[0], 1.0))
        B.pyro.sample("x", B.dist.Normal(z + w[1], tau.rsqrt()), obs=x[ind])


def meanfield_guide(B, x, idx):
    mu_loc = B.pyro.param("mu_loc", torch.tensor(0.7))
    mu_scale = B.pyro.param("mu_scale", torch.tensor(0.3), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, mu_loc, mu_scale, eps(25)))
    t_loc = B.pyro.param("t_loc", torch.tensor(0.0))
    t_scale = B.pyro.param("t_scale", torch.tensor(0.3), constraint=B.constraints.positive)
    B.pyro.sample("tau", fixed_lognormal(B, t_loc, t_scale, eps(26)))
    w_loc = B.pyro.param("w_loc", torch.tensor([0.1, 0.2]))
    w_scale = B.pyro.param("w_scale", torch.ones(2) * 0.5, constraint=B.constraints.positive)
    B.pyro.sample("w", fixed_normal(B, w_loc, w_scale, eps(27, 2)).to_event(1))
    z_loc = B.pyro.param("z_loc", torch.zeros(len(x)))
    z_scale = B.pyro.param("z_scale", torch.ones(len(x)), constraint=B.constraints.positive)
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        B.pyro.sample("z", fixed_normal(B, z_loc[ind], z_scale[ind], eps(30, N)[ind]))


COUNTS_X = 3.0 + 2.0 * _randn(N)


def poisson_model(B, x):
    k = B.pyro.sample("k", B.dist.Poisson(3.0))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("x", B.dist.Normal(k, 2.0), obs=x)


def poisson_guide(B, x):
    rate = B.pyro.param("rate", torch.tensor(2.5), constraint=B.constraints.positive)
    B.pyro.sample("k", fixed_value(B, "Poisson", rate, value=torch.tensor(4.0)))


Z_BITS = (torch.arange(N) % 3 == 0).to(D)
MIX_X = 2.0 * Z_BITS + _randn(N)


def local_bernoulli_model(B, x, idx):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        z = B.pyro.sample("z", B.dist.Bernoulli(0.3))
        B.pyro.sample("x", B.dist.Normal(mu + 2.0 * z, 1.0), obs=x[ind])


def local_bernoulli_guide(B, x, idx):
    loc = B.pyro.param("loc", torch.tensor(0.1))
    scale = B.pyro.param("scale", torch.tensor(0.5), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(50)))
    probs = B.pyro.param(
        "probs", torch.full((len(x),), 0.4), constraint=B.constraints.unit_interval
    )
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        B.pyro.sample("z", fixed_value(B, "Bernoulli", probs[ind], value=Z_BITS[ind]))


def factor_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    B.pyro.deterministic("two_mu", 2.0 * mu)
    B.pyro.factor("penalty", -0.25 * (mu - 1.0) ** 2)
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("obs", B.dist.Normal(mu, 1.0), obs=x)


def map_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    sigma = B.pyro.sample("sigma", B.dist.LogNormal(0.0, 1.0))
    v = B.pyro.sample("v", B.dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("obs", B.dist.Normal(mu + v.sum(), sigma), obs=x)


def map_guide(B, x):
    mu = B.pyro.param("mu_map", torch.tensor(0.5))
    sigma = B.pyro.param("sigma_map", torch.tensor(1.2), constraint=B.constraints.positive)
    v = B.pyro.param("v_map", torch.tensor([0.1, -0.1]))
    B.pyro.sample("mu", B.dist.Delta(mu))
    B.pyro.sample("sigma", B.dist.Delta(sigma))
    B.pyro.sample("v", B.dist.Delta(v, event_dim=1))


def mvn_model(B, y2):
    z = B.pyro.sample("z", B.dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
    with B.pyro.plate("data", len(y2)):
        B.pyro.sample("y", B.dist.MultivariateNormal(z, torch.eye(2) * 0.5), obs=y2)


def mvn_guide(B, y2):
    loc = B.pyro.param("z_loc", torch.tensor([0.2, -0.1]))
    tril = B.pyro.param(
        "z_tril", torch.tensor([[0.5, 0.0], [0.1, 0.4]]), constraint=B.constraints.lower_cholesky
    )
    e = eps(55, 2)
    B.pyro.sample(
        "z",
        fixed(
            B,
            "MultivariateNormal",
            loc,
            scale_tril=tril,
            draw=lambda d: d.loc + (d.scale_tril @ e.unsqueeze(-1)).squeeze(-1),
        ),
    )


def masked_score_model(B, x, idx, m):
    with B.poutine.scale(scale=0.7):
        k = B.pyro.sample("k", B.dist.Poisson(2.0))
    with B.pyro.plate("data", len(x), subsample=idx) as ind, B.poutine.mask(mask=m[ind]):
        z = B.pyro.sample("z", B.dist.Bernoulli(0.3))
        B.pyro.sample("x", B.dist.Normal(0.5 * k + 2.0 * z, 1.0), obs=x[ind])


def masked_score_guide(B, x, idx, m):
    rate = B.pyro.param("rate", torch.tensor(1.5), constraint=B.constraints.positive)
    with B.poutine.scale(scale=0.7):
        B.pyro.sample("k", fixed_value(B, "Poisson", rate, value=torch.tensor(3.0)))
    probs = B.pyro.param(
        "probs", torch.full((len(x),), 0.4), constraint=B.constraints.unit_interval
    )
    with B.pyro.plate("data", len(x), subsample=idx) as ind, B.poutine.mask(mask=m[ind]):
        B.pyro.sample("z", fixed_value(B, "Bernoulli", probs[ind], value=Z_BITS[ind]))


def random_subsample_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(x), subsample_size=6) as ind:
        z = B.pyro.sample("z", B.dist.Normal(mu, 1.0))
        B.pyro.sample("x", B.dist.Normal(z, 0.5), obs=x[ind])


def random_subsample_guide(B, x):
    loc = B.pyro.param("loc", torch.tensor(0.1))
    scale = B.pyro.param("scale", torch.tensor(0.5), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(51)))
    z_loc = B.pyro.param("z_loc", torch.zeros(len(x)))
    with B.pyro.plate("data", len(x), subsample_size=6) as ind:
        B.pyro.sample("z", fixed_normal(B, z_loc[ind], torch.tensor(0.3), eps(30, N)[ind]))


def event_dim_param_guide(B, x, idx):
    mu_loc = B.pyro.param("mu_loc", torch.tensor(0.7))
    B.pyro.sample("mu", fixed_normal(B, mu_loc, torch.tensor(0.3), eps(25)))
    t_loc = B.pyro.param("t_loc", torch.tensor(0.0))
    B.pyro.sample("tau", fixed_lognormal(B, t_loc, torch.tensor(0.3), eps(26)))
    w_loc = B.pyro.param("w_loc", torch.tensor([0.1, 0.2]))
    B.pyro.sample("w", fixed_normal(B, w_loc, torch.tensor(0.5), eps(27, 2)).to_event(1))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        # Pyro subsamples a param's batch dims inside a subsampled plate when event_dim is given
        z_loc = B.pyro.param("z_loc", torch.linspace(-1.0, 1.0, len(x)), event_dim=0)
        z_scale = B.pyro.param(
            "z_scale", torch.full((len(x),), 0.8), constraint=B.constraints.positive, event_dim=0
        )
        B.pyro.sample("z", fixed_normal(B, z_loc, z_scale, eps(30, N)[ind]))


def _net():
    """A small network with fixed weights, built afresh for each run."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=D))
    return net


def module_model(B, x, y, net):
    B.pyro.module("net", net)
    noise = B.pyro.sample("noise", B.dist.LogNormal(0.0, 1.0))
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("y", B.dist.Normal(net(x).squeeze(-1), noise), obs=y)


def module_guide(B, x, y, net):
    loc = B.pyro.param("n_loc", torch.tensor(0.0))
    B.pyro.sample("noise", fixed_lognormal(B, loc, torch.tensor(0.2), eps(60)))


def aux_guide(B, x):
    loc = B.pyro.param("loc", torch.tensor(0.3))
    scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
    u = B.pyro.sample("u", fixed_normal(B, loc, scale, eps(0)), infer={"is_auxiliary": True})
    B.pyro.sample("mu", fixed_normal(B, 2.0 * u, torch.tensor(0.2), eps(1)))


OBS_MASK = torch.arange(N) % 4 != 2
Y_MISSING = torch.where(OBS_MASK, Y_NORMAL, torch.tensor(100.0, dtype=D))  # junk where missing


def obs_mask_model(B, y, m):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(y)):
        B.pyro.sample("y", B.dist.Normal(mu, 1.0), obs=y, obs_mask=m)


def obs_mask_guide(B, y, m):
    loc = B.pyro.param("loc", torch.tensor(0.3))
    scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
    B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(0)))
    y_loc = B.pyro.param("y_loc", torch.zeros(len(y)))
    with B.pyro.plate("data", len(y)):
        B.pyro.sample("y_unobserved", fixed_normal(B, y_loc, torch.tensor(0.5), eps(30, N)))


def masked_latent_model(B, x, m, mask_guide):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(x)):
        z = B.pyro.sample("z", B.dist.Normal(mu, 1.0).mask(m))
        B.pyro.sample("x", B.dist.Normal(z, 0.5), obs=x)


def masked_latent_guide(B, x, m, mask_guide):
    loc = B.pyro.param("loc", torch.tensor(0.2))
    B.pyro.sample("mu", fixed_normal(B, loc, torch.tensor(0.4), eps(0)))
    z_loc = B.pyro.param("z_loc", torch.zeros(len(x)))
    with B.pyro.plate("data", len(x)):
        q = fixed_normal(B, z_loc, torch.tensor(0.6), eps(30, N))
        B.pyro.sample("z", q.mask(m) if mask_guide else q)


def sequential_plate_model(B, x, idx):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    for i in B.pyro.plate("data", len(x), subsample=idx):
        z = B.pyro.sample(f"z_{i}", B.dist.Normal(mu, 1.0))
        B.pyro.sample(f"x_{i}", B.dist.Normal(z, 0.5), obs=x[i])


def sequential_plate_guide(B, x, idx):
    loc = B.pyro.param("loc", torch.tensor(0.2))
    B.pyro.sample("mu", fixed_normal(B, loc, torch.tensor(0.4), eps(0)))
    z_loc = B.pyro.param("z_loc", torch.zeros(len(x)))
    for i in B.pyro.plate("data", len(x), subsample=idx):
        B.pyro.sample(f"z_{i}", fixed_normal(B, z_loc[i], torch.tensor(0.6), eps(30 + i)))


def conditioned_model(B, x):
    B.poutine.condition(hier_model, data={"mu": torch.tensor(0.4)})(B, x, GIDX)


def conditioned_guide(B, x):
    hier_guide(B, x, GIDX)


def nested_random_model(B, data):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 5.0))
    with B.pyro.plate("groups", G, subsample_size=3, dim=-1) as g:
        theta = B.pyro.sample("theta", B.dist.Normal(mu, 1.0))
        with B.pyro.plate("obs", M, subsample_size=2, dim=-2) as o:
            B.pyro.sample("x", B.dist.Normal(theta, 1.0), obs=data[o][:, g])


def nested_random_guide(B, data):
    mu_loc = B.pyro.param("mu_loc", torch.tensor(0.5))
    B.pyro.sample("mu", fixed_normal(B, mu_loc, torch.tensor(0.4), eps(5)))
    t_loc = B.pyro.param("t_loc", torch.linspace(0.0, 1.0, G))
    with B.pyro.plate("groups", G, subsample_size=3, dim=-1) as g:
        B.pyro.sample("theta", fixed_normal(B, t_loc[g], torch.tensor(0.3), eps(10, G)[g]))
    with B.pyro.plate("obs", M, subsample_size=2, dim=-2):
        pass  # drawn in the guide, replayed into the model


WEIGHTS = torch.linspace(0.5, 2.0, N, dtype=D)


def weighted_model(B, x, w):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 10.0))
    target = B.pyro.param("target", torch.tensor(0.3))
    with B.pyro.plate("data", len(x)), B.poutine.scale(scale=w):
        B.pyro.sample("obs", B.dist.Normal(mu, 1.0), obs=x)
    # an observation that depends on a param: its gradient flows through the value
    B.pyro.sample("pseudo", B.dist.Normal(mu, 2.0), obs=2.0 * target)


def delta_log_density_guide(B, x):
    loc = B.pyro.param("loc", torch.tensor(0.3))
    scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
    value = loc + scale * eps(0)
    log_q = torch.distributions.Normal(loc, scale).log_prob(value)  # a reparameterised Normal
    B.pyro.sample("mu", B.dist.Delta(value, log_density=log_q))


def guide_factor_guide(B, x, has_rsample):
    loc = B.pyro.param("loc", torch.tensor(0.3))
    scale = B.pyro.param("scale", torch.tensor(0.8), constraint=B.constraints.positive)
    mu = B.pyro.sample("mu", fixed_normal(B, loc, scale, eps(0)))
    B.pyro.factor("guide_factor", -0.5 * (mu - 1.0) ** 2, has_rsample=has_rsample)


def prior_latent_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 10.0))
    extra = B.pyro.sample("not_in_guide", B.dist.Normal(mu, 0.1))  # drawn from the prior
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("obs", B.dist.Normal(mu + extra, 1.0), obs=x)


def guide_observation_guide(B, x):
    conjugate_guide(B, x)
    p = B.pyro.param("p", torch.tensor(0.3), constraint=B.constraints.unit_interval)
    aux = {"is_auxiliary": True}
    B.pyro.sample("guide_obs", B.dist.Bernoulli(p), obs=torch.tensor(1.0), infer=aux)


def mvn_prior_model(B, y2):
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    z = B.pyro.sample("z", B.dist.MultivariateNormal(torch.zeros(2), cov))
    with B.pyro.plate("data", len(y2)):
        B.pyro.sample("y", B.dist.Normal(z, 0.7).to_event(1), obs=y2)


def diagonal_guide(B, y2):
    loc = B.pyro.param("z_loc", torch.tensor([0.2, -0.1]))
    scale = B.pyro.param("z_scale", torch.tensor([0.5, 0.4]), constraint=B.constraints.positive)
    B.pyro.sample("z", fixed_normal(B, loc, scale, eps(55, 2)).to_event(1))


def full_plate_model(B, x):
    mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(x)) as ind:  # no subsample_size: the guide's is replayed
        z = B.pyro.sample("z", B.dist.Normal(mu, 1.0))
        B.pyro.sample("x", B.dist.Normal(z, 0.5), obs=x[ind])


# ----------------------------------------------------------------------------------- cases


@dataclass
class Case:
    model: Callable
    guide: Callable
    args: tuple | Callable  # a callable builds fresh args (e.g. a module) for each run
    loss: str = "Trace_ELBO"
    loss_kwargs: dict = field(default_factory=dict)


CASES = {
    "conjugate_normal": Case(conjugate_model, conjugate_guide, (Y_NORMAL,)),
    "conjugate_normal_2_particles": Case(
        conjugate_model, conjugate_guide, (Y_NORMAL,), loss_kwargs={"num_particles": 2}
    ),
    "logistic_regression_subsampled": Case(logreg_model, logreg_guide, (X, Y_LOGIT, IDX)),
    "hierarchical_nested_plates": Case(hier_model, hier_guide, (HIER_DATA, GIDX)),
    "scale_and_mask": Case(scale_mask_model, scale_mask_guide, (Y_NORMAL, MASK)),
    "scale_and_mask_mean_field": Case(
        scale_mask_model, scale_mask_guide, (Y_NORMAL, MASK), "TraceMeanField_ELBO"
    ),
    "mean_field_masked_latent": Case(
        masked_latent_model, masked_latent_guide, (Y_NORMAL, MASK, True), "TraceMeanField_ELBO"
    ),
    "mean_field_latent_masked_in_model_only": Case(
        masked_latent_model, masked_latent_guide, (Y_NORMAL, MASK, False), "TraceMeanField_ELBO"
    ),
    "constrained_params": Case(constrained_model, constrained_guide, (Y_NORMAL, CATS, Y2, BITS)),
    "obs_to_event": Case(to_event_model, to_event_guide, (X3,)),
    "mean_field_analytic_kl": Case(
        meanfield_model, meanfield_guide, (Y_NORMAL, IDX), loss="TraceMeanField_ELBO"
    ),
    "mean_field_model_under_trace_elbo": Case(meanfield_model, meanfield_guide, (Y_NORMAL, IDX)),
    "poisson_latent_score_function": Case(poisson_model, poisson_guide, (COUNTS_X,)),
    "local_bernoulli_score_function": Case(
        local_bernoulli_model, local_bernoulli_guide, (MIX_X, IDX)
    ),
    "local_bernoulli_vectorized_particles": Case(
        local_bernoulli_model,
        local_bernoulli_guide,
        (MIX_X, IDX),
        loss_kwargs={"num_particles": 2, "vectorize_particles": True, "max_plate_nesting": 1},
    ),
    "sequential_plate": Case(sequential_plate_model, sequential_plate_guide, (Y_NORMAL, IDX)),
    "model_conditioned_on_a_guide_latent": Case(conditioned_model, conditioned_guide, (HIER_DATA,)),
    "nested_random_subsamples_replayed": Case(
        nested_random_model, nested_random_guide, (HIER_DATA,)
    ),
    "weighted_obs_and_param_dependent_obs": Case(
        weighted_model, lambda B, x, w: conjugate_guide(B, x), (Y_NORMAL, WEIGHTS)
    ),
    "delta_with_log_density": Case(conjugate_model, delta_log_density_guide, (Y_NORMAL,)),
    "guide_factor_reparameterised": Case(
        lambda B, x, h: conjugate_model(B, x), guide_factor_guide, (Y_NORMAL, True)
    ),
    "guide_factor_not_reparameterised": Case(
        lambda B, x, h: conjugate_model(B, x), guide_factor_guide, (Y_NORMAL, False)
    ),
    "latent_missing_from_guide": Case(prior_latent_model, conjugate_guide, (Y_NORMAL,)),
    "non_reparameterised_observation_in_guide": Case(
        conjugate_model, guide_observation_guide, (Y_NORMAL,)
    ),
    "mean_field_diagonal_guide_mvn_prior": Case(
        mvn_prior_model, diagonal_guide, (Y2,), "TraceMeanField_ELBO"
    ),
    "local_bernoulli_2_particles": Case(
        local_bernoulli_model, local_bernoulli_guide, (MIX_X, IDX), loss_kwargs={"num_particles": 2}
    ),
    "mean_field_vectorized_particles": Case(
        hier_model,
        hier_guide,
        (HIER_DATA, GIDX),
        "TraceMeanField_ELBO",
        {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 2},
    ),
    "guide_subsample_replayed_into_a_full_model_plate": Case(
        full_plate_model, random_subsample_guide, (Y_NORMAL,)
    ),
    "factor_and_deterministic": Case(factor_model, conjugate_guide, (Y_NORMAL,)),
    "delta_guide_map": Case(map_model, map_guide, (Y_NORMAL,)),
    "mvn_lower_cholesky_guide": Case(mvn_model, mvn_guide, (Y2,)),
    "delta_guide_under_mean_field": Case(map_model, map_guide, (Y_NORMAL,), "TraceMeanField_ELBO"),
    "mean_field_2_particles": Case(
        meanfield_model,
        meanfield_guide,
        (Y_NORMAL, IDX),
        "TraceMeanField_ELBO",
        {"num_particles": 2},
    ),
    "vectorized_particles": Case(
        hier_model,
        hier_guide,
        (HIER_DATA, GIDX),
        loss_kwargs={"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 2},
    ),
    "scaled_and_masked_score_function": Case(
        masked_score_model, masked_score_guide, (MIX_X, IDX, MASK)
    ),
    "random_subsample_shared_by_model_and_guide": Case(
        random_subsample_model, random_subsample_guide, (Y_NORMAL,)
    ),
    "nn_module_in_model": Case(module_model, module_guide, lambda: (X, Y_NORMAL, _net())),
    "obs_mask_with_missing_values": Case(obs_mask_model, obs_mask_guide, (Y_MISSING, OBS_MASK)),
    "auxiliary_guide_site": Case(conjugate_model, aux_guide, (Y_NORMAL,)),
    "param_event_dim_in_subsampled_plate": Case(
        meanfield_model, event_dim_param_guide, (Y_NORMAL, IDX)
    ),
}


def _args(case):
    return case.args() if callable(case.args) else case.args


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grads(name):
    case = CASES[name]
    results = [
        loss_and_grads(B, case.model, case.guide, _args(case), None, case.loss, case.loss_kwargs)
        for B in both()
    ]
    (want_loss, want_grads, want_values), (loss, grads, values) = results
    assert all(g is not None for g in want_grads.values())
    assert_same_params(values, want_values, "initial unconstrained value")
    assert_close(loss, want_loss, "loss")
    assert_same_params(grads, want_grads, "gradient")


@pytest.mark.parametrize("name", list(CASES))
def test_adam_trajectory(name):
    case = CASES[name]

    def make_optim(B):
        return B.optim.Adam({"lr": 0.05, "betas": (0.8, 0.95)})

    (want_losses, want), (losses, got) = [
        train(
            B, case.model, case.guide, make_optim, 5, _args(case), None, case.loss, case.loss_kwargs
        )
        for B in both()
    ]
    assert_close(losses, want_losses, "per-step losses")
    assert_same_params(got, want, "param after 5 Adam steps")


def test_plate_yields_explicit_indices():
    seen = []

    def model(B):
        with B.pyro.plate("data", N, subsample=IDX) as ind:
            seen.append(ind.clone())
            B.pyro.sample("x", B.dist.Normal(0.0, 1.0), obs=Y_NORMAL[ind])

    log_probs = []
    for B in both():
        tr = B.poutine.trace(model).get_trace(B)
        tr.compute_log_prob()
        log_probs.append(tr.nodes["x"]["log_prob_sum"].detach())
    assert torch.equal(seen[1], seen[0])
    assert_close(log_probs[1], log_probs[0], "log_prob_sum in a subsampled plate")


def test_per_param_optim_callable_sees_normalised_module_names():
    """Pyro calls a one-argument optim callable with ``nn.Module``-style names
    (``"net.0.weight"``, not ``"net$$$0.weight"``)."""
    seen = {}
    case = CASES["nn_module_in_model"]
    for B in both():
        names = seen.setdefault(B.name, set())

        def make_optim(B, names=names):
            def args(name):
                names.add(name)
                return {"lr": 0.01 if name.startswith("net") else 0.1}

            return B.optim.Adam(args)

        train(B, case.model, case.guide, make_optim, 2, _args(case))
    assert seen["distsvi"] == seen["pyro"]


@pytest.mark.parametrize(
    "name",
    [
        "logistic_regression_subsampled",
        "local_bernoulli_score_function",
        "scaled_and_masked_score_function",
        "mean_field_analytic_kl",
    ],
)
def test_differentiable_loss(name):
    case = CASES[name]
    results = []
    for B in both():
        B.pyro.clear_param_store()
        elbo = getattr(B.infer, case.loss)(**case.loss_kwargs)
        with isolated(B):
            loss = elbo.differentiable_loss(bind(case.model, B), bind(case.guide, B), *_args(case))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in B.pyro.get_param_store().named_parameters()}
        results.append((loss.detach(), grads))
    (want_loss, want_grads), (got_loss, got_grads) = results
    assert_close(got_loss, want_loss, "differentiable_loss")
    assert_same_params(got_grads, want_grads, "gradient of differentiable_loss")

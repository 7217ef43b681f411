"""Pyro's own distributions under Pyro 1.9.2 and distsvi: the same class built from the same
arguments must have the same shapes, support, log_prob, moments, samples (equal seeds) and
reparameterised gradients; and as a model site, the same ELBO."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, both, fixed_normal, loss_and_grads

TOL = {"rtol": 1e-6, "atol": 1e-9}
BATCH = (3, 4)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _pos(*shape, seed=0):
    return torch.rand(*shape, generator=_g(seed), dtype=torch.float64) * 3 + 0.2


def _real(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64)


def _counts(*shape, high=8, seed=0):
    return torch.randint(0, high, shape, generator=_g(seed)).double()


def _unit_interval(*shape, seed=0):
    return torch.rand(*shape, generator=_g(seed), dtype=torch.float64) * 0.8 + 0.1


MASK = torch.tensor([True, False, True, False]).expand(BATCH)

# name -> (build(B): the distribution, values: a batch of points in its support)
CASES = {
    "GammaPoisson": (
        lambda B: B.dist.GammaPoisson(_pos(*BATCH), _pos(*BATCH, seed=1)),
        _counts(5, *BATCH),
    ),
    "ZeroInflatedPoisson-gate": (
        lambda B: B.dist.ZeroInflatedPoisson(_pos(*BATCH), gate=_unit_interval(*BATCH)),
        _counts(5, *BATCH, high=4),
    ),
    "ZeroInflatedPoisson-logits": (
        lambda B: B.dist.ZeroInflatedPoisson(_pos(4), gate_logits=_real(*BATCH)),
        _counts(5, *BATCH, high=4),
    ),
    "ZeroInflatedNegativeBinomial-probs": (
        lambda B: B.dist.ZeroInflatedNegativeBinomial(
            _pos(*BATCH), probs=_unit_interval(*BATCH, seed=2), gate=_unit_interval(*BATCH)
        ),
        _counts(5, *BATCH),
    ),
    "ZeroInflatedNegativeBinomial-logits": (
        lambda B: B.dist.ZeroInflatedNegativeBinomial(
            _pos(*BATCH), logits=_real(*BATCH, seed=3), gate_logits=_real(*BATCH)
        ),
        _counts(5, *BATCH),
    ),
    "ZeroInflatedDistribution": (
        lambda B: B.dist.ZeroInflatedDistribution(
            B.dist.Poisson(_pos(*BATCH)), gate_logits=_real(4, seed=4)
        ),
        _counts(5, *BATCH),
    ),
    "BetaBinomial": (
        lambda B: B.dist.BetaBinomial(_pos(*BATCH), _pos(*BATCH, seed=1), total_count=10),
        _counts(5, *BATCH, high=11),
    ),
    "BetaBinomial-tensor-count": (
        lambda B: B.dist.BetaBinomial(_pos(4), _pos(4, seed=1), torch.full(BATCH, 7.0)),
        _counts(5, *BATCH, high=8),
    ),
    "DirichletMultinomial": (
        lambda B: B.dist.DirichletMultinomial(_pos(*BATCH, 5), total_count=9),
        torch.distributions.Multinomial(9, torch.ones(5)).sample((6,) + BATCH).double(),
    ),
    "DirichletMultinomial-sparse": (
        lambda B: B.dist.DirichletMultinomial(
            _pos(4, 5), total_count=torch.full(BATCH, 6.0), is_sparse=True
        ),
        torch.distributions.Multinomial(6, torch.ones(5)).sample((6,) + BATCH).double(),
    ),
    "MaskedMixture": (
        lambda B: B.dist.MaskedMixture(
            MASK, B.dist.Normal(_real(*BATCH), _pos(*BATCH)), B.dist.Normal(2.0, _pos(4))
        ),
        _real(5, *BATCH, seed=7),
    ),
    "MaskedMixture-event": (
        lambda B: B.dist.MaskedMixture(
            MASK,
            B.dist.Normal(_real(*BATCH, 2), 1.0).to_event(1),
            B.dist.Laplace(_real(2), _pos(2)).to_event(1),
        ),
        _real(5, *BATCH, 2, seed=7),
    ),
    "Unit": (lambda B: B.dist.Unit(_real(*BATCH)), torch.empty(5, *BATCH, 0)),
    "ImproperUniform": (
        lambda B: B.dist.ImproperUniform(B.constraints.positive, BATCH, (2,)),
        _pos(5, *BATCH, 2, seed=5),
    ),
    "AsymmetricLaplace": (
        lambda B: B.dist.AsymmetricLaplace(_real(*BATCH), _pos(*BATCH), _pos(4, seed=1)),
        _real(5, *BATCH, seed=7) * 3,
    ),
    "SoftLaplace": (
        lambda B: B.dist.SoftLaplace(_real(*BATCH), _pos(*BATCH)),
        _real(5, *BATCH, seed=7) * 3,
    ),
}

SAMPLEABLE = [n for n in CASES if n != "ImproperUniform"]
REPARAMETERISED = ["AsymmetricLaplace", "SoftLaplace", "MaskedMixture", "MaskedMixture-event"]


def _pair(name):
    pyro_b, distsvi_b = both()
    build, values = CASES[name]
    return build(pyro_b), build(distsvi_b), values


def _close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_support_and_log_prob(name):
    want, got, values = _pair(name)
    assert type(got).__name__ == type(want).__name__
    assert type(got).__module__.startswith("distsvi.")
    assert (got.batch_shape, got.event_shape) == (want.batch_shape, want.event_shape)
    assert got.has_rsample == want.has_rsample
    assert got.support.is_discrete == want.support.is_discrete
    assert got.support.event_dim == want.support.event_dim
    assert torch.equal(got.support.check(values), want.support.check(values))
    _close(got.log_prob(values), want.log_prob(values), f"{name}.log_prob")
    _close(got.log_prob(values[0]), want.log_prob(values[0]), f"{name}.log_prob, one point")


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("Unit", "ImproperUniform")])
def test_mean_and_variance(name):
    want, got, _ = _pair(name)
    _close(got.mean, want.mean, f"{name}.mean")
    _close(got.variance, want.variance, f"{name}.variance")


@pytest.mark.parametrize("name", list(CASES))
def test_expand(name):
    want, got, values = _pair(name)
    want, got = want.expand((2,) + BATCH), got.expand((2,) + BATCH)
    # Pyro wraps an expanded MaskedMixture in its ExpandedDistribution; distsvi's stays one
    assert type(got).__name__ == name.split("-")[0]
    assert (got.batch_shape, got.event_shape) == (want.batch_shape, want.event_shape)
    v = values[:2]
    _close(got.log_prob(v), want.log_prob(v), f"{name}.expand(...).log_prob")
    assert got.expand_by((5,)).batch_shape == want.expand_by((5,)).batch_shape


@pytest.mark.parametrize("name", SAMPLEABLE)
def test_samples_equal_under_equal_seeds(name):
    want, got, _ = _pair(name)
    for shape in [(), (6,), (2, 3)]:
        torch.manual_seed(11)
        w = want.sample(shape)
        torch.manual_seed(11)
        g = got.sample(shape)
        assert g.shape == w.shape == torch.Size(shape) + want.batch_shape + want.event_shape
        if name != "Unit":  # a Unit's value is empty
            assert torch.equal(g, w), f"{name}.sample{shape}: draws differ from Pyro's"
        assert torch.equal(got.support.check(g), want.support.check(w))


@pytest.mark.parametrize("name", REPARAMETERISED)
def test_rsample_values_and_gradients(name):
    pyro_b, distsvi_b = both()
    results = []
    for B in (pyro_b, distsvi_b):
        loc = _real(*BATCH).requires_grad_()
        scale = _pos(*BATCH).requires_grad_()
        if name.startswith("MaskedMixture"):
            d = B.dist.MaskedMixture(MASK, B.dist.Normal(loc, scale), B.dist.SoftLaplace(loc, 1.0))
        elif name == "AsymmetricLaplace":
            d = B.dist.AsymmetricLaplace(loc, scale, 1.5)
        else:
            d = getattr(B.dist, name)(loc, scale)
        torch.manual_seed(5)
        x = d.rsample((7,))
        (x.sin() * d.log_prob(x.detach())).sum().backward()
        results.append((x.detach(), loc.grad, scale.grad))
    for w, g, what in zip(results[0], results[1], ["rsample", "d/dloc", "d/dscale"], strict=True):
        _close(g, w, f"{name} {what}")


def test_soft_laplace_cdf_icdf():
    pyro_b, distsvi_b = both()
    x = _real(6, seed=8) * 2
    want, got = (B.dist.SoftLaplace(0.5, 1.7) for B in (pyro_b, distsvi_b))
    _close(got.cdf(x), want.cdf(x), "cdf")
    u = torch.linspace(0.05, 0.95, 7)
    _close(got.icdf(u), want.icdf(u), "icdf")


def test_beta_binomial_enumerate_support():
    want, got, _ = _pair("BetaBinomial")
    assert torch.equal(got.enumerate_support(), want.enumerate_support())
    assert torch.equal(got.enumerate_support(False), want.enumerate_support(False))


def test_unit_has_rsample_switch():
    for B in both():
        assert B.dist.Unit(torch.zeros(2), has_rsample=True).expand((3, 2)).has_rsample
        assert not B.dist.Unit(torch.zeros(2)).has_rsample


def test_improper_uniform_refuses_to_sample():
    for B in both():
        with pytest.raises(NotImplementedError):
            B.dist.ImproperUniform(B.constraints.real, (), (3,)).sample()


def test_masked_mixture_mixed_support():
    for_values = torch.tensor([-1.0, 0.5, -1.0, 0.5])
    want, got = (
        B.dist.MaskedMixture(
            torch.tensor([True, True, False, False]),
            B.dist.Normal(0.0, 1.0),
            B.dist.Gamma(1.0, 1.0),
        ).expand((4,))
        for B in both()
    )
    assert torch.equal(got.support.check(for_values), want.support.check(for_values))


# -- as sites of a model under Trace_ELBO ------------------------------------------------

N = 6
_EPS = _real(N, seed=21)
_EPS3 = _real(3, seed=22)


def _obs_model(B, counts, mix_obs, props):
    """Observed sites of each discrete distribution, their params from shared latents."""
    w = B.pyro.sample("w", B.dist.Normal(torch.zeros(N), 1.0).to_event(1))
    gate = B.pyro.param("gate", torch.tensor(0.3), constraint=B.constraints.unit_interval)
    conc = B.pyro.param("conc", torch.full((5,), 1.5), constraint=B.constraints.positive)
    rate = w.exp()
    with B.pyro.plate("data", N):
        B.pyro.sample("gp", B.dist.GammaPoisson(2.0, rate), obs=counts)
        B.pyro.sample("zip", B.dist.ZeroInflatedPoisson(rate, gate=gate), obs=counts)
        B.pyro.sample(
            "zinb",
            B.dist.ZeroInflatedNegativeBinomial(3.0, logits=w, gate_logits=w - 1),
            obs=counts,
        )
        B.pyro.sample("bb", B.dist.BetaBinomial(rate, 1.0, total_count=9), obs=counts)
        B.pyro.sample("dm", B.dist.DirichletMultinomial(conc, total_count=7), obs=props)
        mix = B.dist.MaskedMixture(counts > 2, B.dist.Normal(w, 1.0), B.dist.Laplace(w, 2.0))
        B.pyro.sample("mix", mix, obs=mix_obs)
        unit = B.dist.Unit(-(w**2))
        B.pyro.sample("unit", unit, obs=unit.sample(), infer={"is_auxiliary": True})


def _obs_guide(B, counts, mix_obs, props):
    loc = B.pyro.param("w_loc", torch.zeros(N))
    scale = B.pyro.param("w_scale", torch.ones(N), constraint=B.constraints.positive)
    B.pyro.sample("w", fixed_normal(B, loc, scale, _EPS).to_event(1))


def _latent_model(B):
    """Latent sites of the continuous ones, scored by the model at the guide's value."""
    x = B.pyro.sample("x", B.dist.ImproperUniform(B.constraints.real, (), (3,)))
    B.pyro.sample("al", B.dist.AsymmetricLaplace(x, 1.3, 0.7).to_event(1))
    B.pyro.sample("sl", B.dist.SoftLaplace(x.sum(), 0.8))
    B.pyro.sample("y", B.dist.Normal(x, 1.0).to_event(1), obs=torch.tensor([0.5, -1.0, 2.0]))


def _latent_guide(B):
    loc = B.pyro.param("loc", torch.zeros(3))
    B.pyro.sample("x", fixed_normal(B, loc, 1.0, _EPS3).to_event(1))
    B.pyro.sample("al", fixed_normal(B, loc * 2, 0.5, _EPS3.flip(0)).to_event(1))
    s = B.pyro.param("s", torch.tensor(0.2))
    B.pyro.sample("sl", B.dist.SoftLaplace(s, 1.1))


def _check_elbo(model, guide, args=()):
    (want, want_grads, _), (got, got_grads, _) = (
        loss_and_grads(B, model, guide, args) for B in both()
    )
    assert_close(got, want, "ELBO loss")
    assert set(got_grads) == set(want_grads)
    for name, w in want_grads.items():
        assert_close(got_grads[name], w, f"gradient of {name!r}")


def test_observed_sites_in_svi():
    counts = _counts(N, high=6, seed=9)
    props = torch.distributions.Multinomial(7, torch.ones(5)).sample((N,)).double()
    _check_elbo(_obs_model, _obs_guide, (counts, _real(N, seed=10), props))


def test_latent_sites_in_svi():
    """SoftLaplace is drawn by the guide with fresh noise: the seed makes both draws equal."""
    _check_elbo(_latent_model, _latent_guide)

"""Trace_ELBO's sums-only scoring: once a site set is validated, a ``.to_event(n)`` site
with a number for its scale sums its base's log-density straight to a scalar. The sums,
the loss and the gradients must be those of the batch-shaped path."""

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.infer import Trace_ELBO
from distsvi.infer.autoguide import AutoNormal

N, B = 100, 10


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    return x, torch.randn(N, generator=g, dtype=torch.float64)


def model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", N, subsample_size=B) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(B, 2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x[idx] @ w + z.sum(-1), 1.0), obs=y[idx])


def traces(elbo, guide, seed):
    pyro.set_rng_seed(seed)
    return elbo._get_trace(model, guide, data(), {})


def sums(trace):
    return {n: s["log_prob_sum"] for n, s in trace.nodes.items() if s["type"] == "sample"}


def test_validated_site_sets_are_scored_by_sums_alone_with_the_same_numbers():
    guide = AutoNormal(model)
    elbo = Trace_ELBO()
    first = traces(elbo, guide, 0)  # the first run of a site set: everything, and validated
    assert all("log_prob" in s for s in first[0].nodes.values() if s["type"] == "sample")
    batch_shaped = Trace_ELBO()
    batch_shaped._reads_only_sums = False
    full = traces(batch_shaped, guide, 1)
    fast = traces(elbo, guide, 1)
    # the .to_event sites skip the batch-shaped log_prob; the plain Normal site keeps it
    assert "log_prob" not in fast[0].nodes["w"] and "log_prob" not in fast[0].nodes["z"]
    assert "log_prob" in fast[0].nodes["y"]
    assert "log_prob" not in fast[1].nodes["z_unconstrained"]
    for got_trace, want_trace in zip(fast, full):
        got, want = sums(got_trace), sums(want_trace)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_loss_and_gradients_agree_with_the_batch_shaped_path():
    guide = AutoNormal(model)
    results = []
    for sums_only in (False, True):
        elbo = Trace_ELBO()
        elbo._reads_only_sums = sums_only
        pyro.set_rng_seed(3)
        guide(*data())  # create the params
        elbo.loss_and_grads(model, guide, *data())  # the first (validated) run
        params = dict(pyro.get_param_store().named_parameters())
        for p in params.values():
            p.grad = None
        pyro.set_rng_seed(4)
        loss = elbo.loss_and_grads(model, guide, *data())
        results.append((loss, {n: p.grad.clone() for n, p in params.items()}))
        for p in params.values():
            p.grad = None
    (loss_full, grads_full), (loss_fast, grads_fast) = results
    assert loss_fast == pytest.approx(loss_full, rel=1e-12)
    assert grads_full.keys() == grads_fast.keys() and len(grads_full) == 4
    for name, g in grads_full.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-10, atol=1e-12)


def test_a_guide_with_a_non_reparameterised_site_keeps_every_log_prob():
    def model_d(x, y):
        k = pyro.sample("k", dist.Bernoulli(torch.tensor(0.3, dtype=x.dtype)))
        with pyro.plate("data", N, subsample_size=B) as idx:
            pyro.sample("y", dist.Normal(k + x[idx, 0], 1.0), obs=y[idx])

    def guide_d(x, y):
        p = pyro.param("p", torch.tensor(0.5, dtype=x.dtype))
        pyro.sample("k", dist.Bernoulli(p))

    elbo = Trace_ELBO()
    for _ in range(2):
        model_trace, guide_trace = elbo._get_trace(model_d, guide_d, data(), {})
    # the score-function term weighs each site's log p - log q: all are kept
    assert "log_prob" in model_trace.nodes["y"] and "log_prob" in guide_trace.nodes["k"]
    assert "score_parts" in guide_trace.nodes["k"]


def test_a_shape_error_still_names_the_site_on_the_sums_path():
    guide = AutoNormal(model)
    model_trace, _ = Trace_ELBO()._raw_traces(model, guide, data(), {})
    model_trace.nodes["w"]["value"] = torch.zeros(4, dtype=torch.float64)  # wrong size
    with pytest.raises(ValueError, match="site 'w'"):
        model_trace.compute_log_prob_sums()

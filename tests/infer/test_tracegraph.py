"""TraceGraph_ELBO: variance reduction over Trace_ELBO, baselines, and their errors."""

from __future__ import annotations

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from distsvi.optim import Adam

N, K = 30, 10
X = 2.0 * (torch.arange(N) % 3 == 0).float() + torch.randn(
    N, generator=torch.Generator().manual_seed(1)
)
IDX = torch.arange(0, N, 3)
P = 1000


def model(x, idx):
    with pyro.plate("groups", K):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(x), subsample=idx) as ind:
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(mu[..., ind % K] + 2.0 * z, 1.0), obs=x[ind])


def make_guide(per_draw: dict, baseline: dict | None = None):
    def guide(x, idx):
        loc = pyro.param("loc", torch.full((K,), 0.1))
        scale = pyro.param("scale", torch.full((K,), 0.5), constraint=dist.constraints.positive)
        with pyro.plate("groups", K):
            pyro.sample("mu", dist.Normal(loc, scale))
        probs = pyro.param(
            "probs", torch.linspace(0.2, 0.8, len(x)), constraint=dist.constraints.unit_interval
        )
        with pyro.plate("data", len(x), subsample=idx) as ind:
            # one copy of the probs per particle, so that each particle's gradient is kept
            q = probs[ind] * torch.ones(P, 1)
            if q.requires_grad:
                q.retain_grad()
            per_draw["q"] = q
            infer = {} if baseline is None else {"baseline": baseline}
            pyro.sample("z", dist.Bernoulli(q), infer=infer)

    return guide


def per_draw_grads(elbo_cls) -> torch.Tensor:
    """Gradient of the loss wrt the subsample's Bernoulli probs, one row per draw."""
    store: dict = {}
    elbo = elbo_cls(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss_and_grads(model, make_guide(store), X, IDX)
    return store["q"].grad * P  # the loss averages the particles


def test_rao_blackwellisation_cuts_gradient_variance_3x():
    torch.manual_seed(0)
    g_trace = per_draw_grads(Trace_ELBO)
    g_graph = per_draw_grads(TraceGraph_ELBO)
    ratio = g_trace.var(0).sum() / g_graph.var(0).sum()
    assert ratio >= 3.0, f"variance ratio Trace_ELBO / TraceGraph_ELBO = {ratio:.2f}"
    # both are unbiased: their means agree within Monte-Carlo error
    se = (g_trace.var(0) / P + g_graph.var(0) / P).sqrt()
    assert ((g_trace.mean(0) - g_graph.mean(0)).abs() < 5 * se).all()


def test_downstream_cost_excludes_upstream_and_other_datapoints():
    # z's cost must not contain the groups' terms (upstream) nor other datapoints' terms:
    # with those terms zeroed by a huge observation noise, the score weight is z's own.
    def local_model(x, idx):
        with pyro.plate("groups", K):
            pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("z", dist.Bernoulli(0.3))

    store: dict = {}
    torch.manual_seed(0)
    TraceGraph_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1).loss_and_grads(
        local_model, make_guide(store), X, IDX
    )
    q = store["q"].detach()[0]
    g = store["q"].grad * P
    # d/dq of -(N/B) E_q[log p(z) - log q(z)], exactly
    logit = torch.special.logit
    exact = -(N / len(IDX)) * (logit(torch.tensor(0.3)) - logit(q))
    assert torch.allclose(g.mean(0), exact, atol=6 * (g.var(0) / P).sqrt().max() + 1e-5)


def test_decaying_average_baseline_state_lives_on_the_elbo():
    elbo = TraceGraph_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    guide = make_guide({}, {"use_decaying_avg_baseline": True, "baseline_beta": 0.5})
    elbo.loss_and_grads(model, guide, X, IDX)
    first = elbo._avg_cost["z"].clone()
    assert first.shape == (P, len(IDX))
    elbo.loss(model, guide, X, IDX)  # evaluating the loss leaves the baseline alone
    assert torch.equal(elbo._avg_cost["z"], first)
    elbo.loss_and_grads(model, guide, X, IDX)
    assert not torch.equal(elbo._avg_cost["z"], first)


def test_nn_baseline_is_fit():
    net = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(net.weight)
    torch.nn.init.zeros_(net.bias)

    def guide(x, idx):
        pyro.module("baseline_net", net)
        probs = pyro.param(
            "probs", torch.full((len(x),), 0.5), constraint=dist.constraints.unit_interval
        )
        with pyro.plate("groups", K):
            pyro.sample("mu", dist.Normal(torch.zeros(K), 1.0))
        with pyro.plate("data", len(x), subsample=idx) as ind:
            baseline = {
                "nn_baseline": lambda h: net(h).squeeze(-1),
                "nn_baseline_input": x[ind, None],
            }
            pyro.sample("z", dist.Bernoulli(probs[ind]), infer={"baseline": baseline})

    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceGraph_ELBO())
    for _ in range(50):
        svi.step(X, IDX)
    assert net.bias.item() != 0.0  # the baseline's squared error trained the network


@pytest.mark.parametrize(
    "options, match",
    [
        ({"use_decaying_avg": True}, "unrecognized baseline options"),
        ({"baseline_value": torch.zeros(10), "nn_baseline": torch.nn.Identity()}, "not both"),
        ({"baseline_value": torch.zeros(3)}, "expected the shape of its downstream cost"),
    ],
)
def test_baseline_errors_name_the_site(options, match):
    def guide(x, idx):
        with pyro.plate("groups", K):
            pyro.sample("mu", dist.Normal(torch.zeros(K), 1.0))
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("z", dist.Bernoulli(0.5), infer={"baseline": options})

    with pytest.raises(ValueError, match=match):
        TraceGraph_ELBO().loss_and_grads(model, guide, X, IDX)


def test_sequential_plate_iterations_do_not_see_each_other():
    # iteration i's z only affects iteration i's observation; the sum over the other
    # iterations would otherwise enter its score weight
    data = torch.tensor([0.0, 5.0, -5.0])

    def seq_model():
        for i in pyro.plate("seq", 3):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(0.5))
            pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=data[i])

    def seq_guide():
        p = pyro.param("p", torch.full((3,), 0.5), constraint=dist.constraints.unit_interval)
        for i in pyro.plate("seq", 3):
            pyro.sample(f"z_{i}", dist.Bernoulli(p[i]))

    from distsvi import poutine
    from distsvi.infer.tracegraph_elbo import _downstream_costs

    guide_trace = poutine.trace(seq_guide).get_trace()
    model_trace = poutine.trace(poutine.replay(seq_model, trace=guide_trace)).get_trace()
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    costs = _downstream_costs(model_trace, guide_trace, ["z_0", "z_1", "z_2"])
    for i in range(3):
        own = (
            model_trace.nodes[f"z_{i}"]["log_prob"]
            + model_trace.nodes[f"x_{i}"]["log_prob"]
            - guide_trace.nodes[f"z_{i}"]["log_prob"]
        )
        assert torch.allclose(costs[f"z_{i}"], own)

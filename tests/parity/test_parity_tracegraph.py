"""TraceGraph_ELBO parity with Pyro 1.9.2: a Bernoulli latent per datapoint inside a
subsampled plate (plus K global group means), with and without baselines, one particle
and 8 vectorized particles.

Draws are made equal by the guide's fixed-value Bernoulli (see ``parity_harness``); each
case calls ``loss_and_grads`` three times in a row with different draws, so the
decaying-average baseline's state is exercised as well.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, bind, both, fixed, fixed_normal

D = torch.float64
_g = torch.Generator().manual_seed(77)
N = 30
X = 2.0 * (torch.arange(N) % 3 == 0).to(D) + torch.randn(N, generator=_g, dtype=D)
IDX = torch.tensor([4, 29, 0, 13, 7, 21, 2, 18, 9])
K = 5
EPS = torch.randn(3, K, generator=_g, dtype=D)


def model(B, x, idx, zs, baseline):
    with B.pyro.plate("groups", K):
        mu = B.pyro.sample("mu", B.dist.Normal(0.0, 3.0))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        z = B.pyro.sample("z", B.dist.Bernoulli(0.3))
        B.pyro.sample("x", B.dist.Normal(mu[..., ind % K] + 2.0 * z, 1.0), obs=x[ind])


def guide(B, x, idx, zs, baseline):
    loc = B.pyro.param("loc", torch.full((K,), 0.1))
    scale = B.pyro.param("scale", torch.full((K,), 0.5), constraint=B.constraints.positive)
    with B.pyro.plate("groups", K):
        B.pyro.sample("mu", fixed_normal(B, loc, scale, zs["eps"]))
    probs = B.pyro.param(
        "probs", torch.linspace(0.2, 0.8, len(x)), constraint=B.constraints.unit_interval
    )
    infer = {"baseline": baseline(B, zs["z"].shape)} if baseline is not None else {}
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        B.pyro.sample("z", fixed(B, "Bernoulli", probs[ind], draw=_draw(zs["z"])), infer=infer)


def _draw(z):
    # the trial run that guesses max_plate_nesting has no particle dim: use particle 0
    return lambda d: z if z.shape == d.batch_shape else z[0].expand(d.batch_shape)


def _draws(particles: int | None, call: int) -> dict:
    g = torch.Generator().manual_seed(100 + call)
    shape = (len(IDX),) if particles is None else (particles, len(IDX))
    return {"z": (torch.rand(shape, generator=g) < 0.5).to(D), "eps": EPS[call]}


BASELINES = {
    "none": None,
    "decaying_avg": lambda B, shape: {"use_decaying_avg_baseline": True, "baseline_beta": 0.8},
    "baseline_value": lambda B, shape: {
        "baseline_value": B.pyro.param("b0", torch.full(shape, -3.0))
    },
}


def _run(B, baseline, particles):
    B.pyro.clear_param_store()
    torch.manual_seed(0)
    kwargs = {} if particles is None else {"num_particles": particles, "vectorize_particles": True}
    elbo = B.infer.TraceGraph_ELBO(**kwargs)
    out = []
    for call in range(3):
        args = (X, IDX, _draws(particles, call), BASELINES[baseline])
        loss = elbo.loss_and_grads(bind(model, B), bind(guide, B), *args)
        params = dict(B.pyro.get_param_store().named_parameters())
        grads = {
            n: p.grad.detach().clone()
            for n, p in params.items()
            if not n.startswith("__baseline") and p.grad is not None
        }
        for p in params.values():
            p.grad = None
        out.append((float(loss), grads))
    B.pyro.clear_param_store()
    return out


@pytest.mark.parametrize("particles", [None, 8], ids=["one_particle", "vectorized_8"])
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_tracegraph_matches_pyro(baseline, particles):
    want, got = (_run(B, baseline, particles) for B in both())
    for call, ((want_loss, want_grads), (loss, grads)) in enumerate(zip(want, got)):
        assert_close(loss, want_loss, f"loss of call {call}")
        assert set(grads) == set(want_grads)
        for name in want_grads:
            assert_close(grads[name], want_grads[name], f"gradient of {name!r}, call {call}")

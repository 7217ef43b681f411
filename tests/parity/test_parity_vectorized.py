"""``vectorize_particles=True`` parity with Pyro 1.9.2 for Trace_ELBO and
TraceMeanField_ELBO: all particles in one pass, the plate nesting guessed or given."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, assert_same_params, both, fixed, loss_and_grads

D = torch.float64
_g = torch.Generator().manual_seed(5)
P = 6
N = 12
X = torch.randn(N, 2, generator=_g, dtype=D)
Y = X @ torch.tensor([1.0, -0.5], dtype=D) + 0.3 * torch.randn(N, generator=_g, dtype=D)
IDX = torch.tensor([1, 7, 3, 10, 0])
EPS = torch.randn(P, 8 + N, generator=_g, dtype=D)


def _normal(B, loc, scale, eps):
    def draw(d):
        # the trial run that guesses the plate nesting has no particle dim: use particle 0
        e = eps if d.batch_shape[:1] == (P,) else eps[0]
        return d.loc + d.scale * e.reshape(d.batch_shape)

    return fixed(B, "Normal", loc, scale, draw=draw)


def model(B, x, y, idx):
    w = B.pyro.sample("w", B.dist.Normal(torch.zeros(2), 2.0).to_event(1))
    sigma = B.pyro.sample("sigma", B.dist.LogNormal(0.0, 1.0))
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        u = B.pyro.sample("u", B.dist.Normal(0.0, 1.0))
        mean = (x[ind] * w.unsqueeze(-2)).sum(-1) + 0.1 * u
        B.pyro.sample("y", B.dist.Normal(mean, sigma.unsqueeze(-1)), obs=y[ind])


def guide(B, x, y, idx):
    w_loc = B.pyro.param("w_loc", torch.tensor([0.2, -0.1]))
    w_scale = B.pyro.param("w_scale", torch.tensor([0.3, 0.4]), constraint=B.constraints.positive)
    s_loc = B.pyro.param("s_loc", torch.tensor(-0.5))
    u_loc = B.pyro.param("u_loc", torch.zeros(len(x)))
    B.pyro.sample("w", _normal(B, w_loc, w_scale, EPS[:, 0:2]).to_event(1))
    B.pyro.sample("sigma", B.dist.LogNormal(s_loc, 0.2))  # seeded: both engines draw alike
    with B.pyro.plate("data", len(x), subsample=idx) as ind:
        B.pyro.sample("u", _normal(B, u_loc[ind], 0.5, EPS[:, 2 : 2 + len(idx)]))


@pytest.mark.parametrize("loss", ["Trace_ELBO", "TraceMeanField_ELBO"])
@pytest.mark.parametrize("nesting", [None, 1], ids=["guessed", "given"])
def test_vectorized_particles_match_pyro(loss, nesting):
    kwargs = {"num_particles": P, "vectorize_particles": True}
    if nesting is not None:
        kwargs["max_plate_nesting"] = nesting
    results = []
    for B in both():
        torch.manual_seed(3)
        results.append(loss_and_grads(B, model, guide, (X, Y, IDX), None, loss, kwargs))
    (want_loss, want_grads, _), (got_loss, got_grads, _) = results
    assert_close(got_loss, want_loss, "loss")
    assert_same_params(got_grads, want_grads, "gradient")

"""SVI on a conjugate normal-normal model reaches the exact posterior.

The ELBO's gradient with one Monte-Carlo draw is too noisy to pin the posterior std to 2% in
a few thousand steps, so the model holds ``REPLICAS`` independent copies of the same
problem (a plate over the copies) and the guide shares its two params across them: each
step then averages that many draws, and the optimum is still the exact posterior.
"""

from __future__ import annotations

import math

import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import ClippedAdam

PRIOR_LOC, PRIOR_SCALE, NOISE = 1.0, 2.0, 1.5


REPLICAS = 128


def model(x: torch.Tensor) -> None:
    with pyro.plate("replicas", REPLICAS, dim=-2):
        mu = pyro.sample("mu", dist.Normal(PRIOR_LOC, PRIOR_SCALE))
        with pyro.plate("data", len(x), dim=-1):
            pyro.sample("obs", dist.Normal(mu, NOISE), obs=x.expand(REPLICAS, len(x)))


def guide(x: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("replicas", REPLICAS, dim=-2):
        pyro.sample("mu", dist.Normal(loc, scale))


def exact_posterior(x: torch.Tensor) -> tuple[float, float]:
    precision = 1.0 / PRIOR_SCALE**2 + len(x) / NOISE**2
    mean = (PRIOR_LOC / PRIOR_SCALE**2 + x.sum().item() / NOISE**2) / precision
    return mean, 1.0 / math.sqrt(precision)


def test_normal_normal_reaches_exact_posterior():
    x = 2.5 + NOISE * torch.randn(100, generator=torch.Generator().manual_seed(3))
    mean, std = exact_posterior(x)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    steps, tail = 800, 300
    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO())
    locs, log_scales = [], []
    for step in range(steps):
        svi.step(x)
        if step >= steps - tail:  # average the iterates to remove the last steps' noise
            locs.append(pyro.param("loc").item())
            log_scales.append(math.log(pyro.param("scale").item()))
    got_mean = sum(locs) / tail
    got_std = math.exp(sum(log_scales) / tail)
    assert abs(got_mean - mean) < 0.02 * abs(mean), (got_mean, mean)
    assert abs(got_std - std) < 0.02 * std, (got_std, std)

"""Small models and guides for the data-parallel tests.

Each model takes ``(x, y, batch=None, idx=None)``: ``batch`` is the plate's
``subsample_size`` (sharded by :class:`~distsvi.distributed.DataParallelSVI`), ``idx``
explicit indices (the DataLoader path, and the single-process reference on a union of
subsamples). ``x`` and ``y`` are the full data.
"""

from __future__ import annotations

import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.distributions import constraints


def make_logistic(n: int = 512, d: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, device="cpu")
    w = torch.linspace(-1.0, 1.0, d, device="cpu")
    y = torch.bernoulli(torch.sigmoid(x @ w + 0.3), generator=g)
    return _here(x), _here(y)


def _here(t: torch.Tensor) -> torch.Tensor:
    """Data is drawn on the CPU (same numbers everywhere), then moved to the default
    device and dtype (a GPU under NCCL)."""
    return t.to(torch.get_default_device(), torch.get_default_dtype())


def logistic_model(x, y, batch=None, idx=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch, subsample=idx) as i:
        pyro.sample("obs", dist.Bernoulli(logits=x[i] @ w + b), obs=y[i])


def logistic_delta_guide(x, y, batch=None, idx=None):
    w = pyro.param("w_loc", torch.linspace(-0.2, 0.2, x.shape[1]))
    b = pyro.param("b_loc", torch.tensor(0.1))
    pyro.sample("w", dist.Delta(w).to_event(1))
    pyro.sample("b", dist.Delta(b))


def logistic_normal_guide(x, y, batch=None, idx=None):
    w_loc = pyro.param("w_loc", torch.zeros(x.shape[1]))
    w_scale = pyro.param("w_scale", torch.full((x.shape[1],), 0.1), constraint=constraints.positive)
    b_loc = pyro.param("b_loc", torch.tensor(0.0))
    b_scale = pyro.param("b_scale", torch.tensor(0.1), constraint=constraints.positive)
    pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
    pyro.sample("b", dist.Normal(b_loc, b_scale))


def make_hierarchical(n: int = 256, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 1.5 + torch.randn(n, generator=g, device="cpu")
    y = z + 0.5 * torch.randn(n, generator=g, device="cpu")
    return torch.zeros(n, 1), _here(y)


def hierarchical_model(x, y, batch=None, idx=None):
    """A global latent ``mu`` and a per-datapoint latent ``z``."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 2.0))
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=y[i])


def hierarchical_delta_guide(x, y, batch=None, idx=None):
    mu = pyro.param("mu_loc", torch.tensor(0.5))
    z = pyro.param("z_loc", torch.zeros(y.shape[0]))
    pyro.sample("mu", dist.Delta(mu))
    with pyro.plate("data", y.shape[0], subsample_size=batch, subsample=idx) as i:
        pyro.sample("z", dist.Delta(z[i]))

"""Built-in models for the shipped configs, written the way a user writes their own.

A job's model is either a plain function or a class. A class is built with the config's
``model.options`` and provides ``model`` (and, for ``guide.name: model``, ``guide``); an
``nn.Module`` class also has its buffers checkpointed. Models are called as::

    model(*inputs, observations, size=N, subsample_size=B, subsample=None)

where the dataset's last tensor holds the observations (``None`` when predicting) and the
``"data"`` plate is opened with ``size``, ``subsample_size`` and ``subsample``. With
in-memory data the plate picks this step's rows (``subsample is None``: index the full
tensors with the plate's indices); with a DataLoader the tensors already are the minibatch
and ``subsample`` holds its row indices. :func:`rows` does that selection.

An optional ``report(samples, *data) -> dict[str, float]`` turns posterior predictive
samples on the validation rows into the figures printed at the end of a run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import distsvi
import distsvi.distributions as dist
from distsvi.distributions import constraints


def rows(idx: Tensor, subsample: Tensor | None, *tensors: Tensor | None) -> tuple:
    """This step's rows: the plate's indices into full tensors, or the minibatch as given."""
    if subsample is not None:
        return tensors
    return tuple(None if t is None else t.index_select(0, idx.to(t.device)) for t in tensors)


class LogisticRegression:
    """Bayesian logistic regression: ``y ~ Bernoulli(logits = x @ w + b)``, Normal priors."""

    def __init__(self, prior_scale: float = 1.0) -> None:
        self.prior_scale = prior_scale

    def model(self, x, y=None, *, size, subsample_size=None, subsample=None):
        zeros = x.new_zeros(x.shape[-1])
        w = distsvi.sample("w", dist.Normal(zeros, self.prior_scale).to_event(1))
        b = distsvi.sample("b", dist.Normal(x.new_zeros(()), self.prior_scale))
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            x, y = rows(idx, subsample, x, y)
            return distsvi.sample("obs", dist.Bernoulli(logits=x @ w + b), obs=y)

    def report(self, samples: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
        # The posterior predictive mean is P(y=1 | x, data); predict its more likely class.
        p = samples["obs"].float().mean(0)
        return {
            "held-out accuracy of the posterior predictive mean": float(
                ((p > 0.5) == (y > 0.5)).float().mean()
            )
        }


class Hierarchical:
    """Varying intercepts: ``y_i ~ Normal(alpha[g_i] + beta * x_i, sigma)``,
    ``alpha_g ~ Normal(mu, tau)`` for ``num_groups`` groups."""

    def __init__(self, num_groups: int = 100) -> None:
        self.num_groups = num_groups

    def model(self, x, group, y=None, *, size, subsample_size=None, subsample=None):
        mu = distsvi.sample("mu", dist.Normal(x.new_zeros(()), 5.0))
        tau = distsvi.sample("tau", dist.HalfNormal(x.new_ones(()) * 2.0))
        sigma = distsvi.sample("sigma", dist.HalfNormal(x.new_ones(()) * 2.0))
        beta = distsvi.sample("beta", dist.Normal(x.new_zeros(()), 2.0))
        with distsvi.plate("groups", self.num_groups):
            alpha = distsvi.sample("alpha", dist.Normal(mu, tau))
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            x, group, y = rows(idx, subsample, x, group, y)
            mean = alpha.index_select(-1, group) + beta * x
            return distsvi.sample("obs", dist.Normal(mean, sigma), obs=y)

    def report(
        self, samples: dict[str, Tensor], x: Tensor, group: Tensor, y: Tensor
    ) -> dict[str, float]:
        rmse = (samples["obs"].mean(0) - y).pow(2).mean().sqrt()
        return {"held-out RMSE of the posterior predictive mean": float(rmse)}


class VAE(nn.Module):
    """Variational autoencoder for 8x8 digits: Bernoulli pixels, Normal latent code,
    MLP encoder and decoder registered with :func:`distsvi.module`; use ``guide.name: model``."""

    def __init__(self, input_dim: int = 64, z_dim: int = 8, hidden_dim: int = 128) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, input_dim)
        )

    def model(self, x, obs=None, *, size, subsample_size=None, subsample=None):
        distsvi.module("decoder", self.decoder)
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (x,) = rows(idx, subsample, x)
            prior = dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1)
            z = distsvi.sample("z", prior)
            (obs,) = rows(idx, subsample, obs)
            return distsvi.sample(
                "obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=obs
            )

    def guide(self, x, obs=None, *, size, subsample_size=None, subsample=None):
        distsvi.module("encoder", self.encoder)
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (x,) = rows(idx, subsample, x)
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            distsvi.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def report(self, samples: dict[str, Tensor], x: Tensor, obs: Tensor) -> dict[str, float]:
        err = (samples["obs"].float().mean(0) - obs).abs().mean()
        return {"held-out mean absolute reconstruction error": float(err)}


class GaussianMixture:
    """A mixture of ``num_components`` Gaussians with discrete assignments ``z_i``.

    ``z_i`` is sampled in the guide from a Categorical, which has no reparameterisation,
    so this model needs ``loss.name: TraceGraph_ELBO`` (score-function gradients with the
    plate's Rao-Blackwellisation). Use ``guide.name: model``.
    """

    def __init__(
        self,
        num_components: int = 3,
        dim: int = 2,
        prior_scale: float = 5.0,
        noise_scale: float = 1.0,
    ) -> None:
        self.k, self.dim = num_components, dim
        self.prior_scale, self.noise_scale = prior_scale, noise_scale

    def model(self, x, obs=None, *, size, subsample_size=None, subsample=None):
        weights = distsvi.sample("weights", dist.Dirichlet(x.new_ones(self.k)))
        with distsvi.plate("components", self.k):
            locs = distsvi.sample(
                "locs", dist.Normal(x.new_zeros(self.dim), self.prior_scale).to_event(1)
            )
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (obs,) = rows(idx, subsample, obs)
            n = idx.shape[0]
            z = distsvi.sample("z", dist.Categorical(weights.expand(n, self.k)))
            return distsvi.sample(
                "obs", dist.Normal(locs[z], self.noise_scale).to_event(1), obs=obs
            )

    def guide(self, x, obs=None, *, size, subsample_size=None, subsample=None):
        init = (
            torch.randn(self.k, self.dim, generator=torch.Generator().manual_seed(0))
            * self.prior_scale
            / 2
        )
        conc = distsvi.param(
            "gmm.concentration", x.new_ones(self.k) * 10, constraint=constraints.positive
        )
        loc = distsvi.param("gmm.locs_loc", init.to(x))
        scale = distsvi.param(
            "gmm.locs_scale", x.new_full((self.k, self.dim), 0.1), constraint=constraints.positive
        )
        weights = distsvi.sample("weights", dist.Dirichlet(conc))
        with distsvi.plate("components", self.k):
            locs = distsvi.sample("locs", dist.Normal(loc, scale).to_event(1))
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (x,) = rows(idx, subsample, x)
            # q(z_i) is the posterior responsibility under the sampled weights and locations.
            sq = (x.unsqueeze(-2) - locs).pow(2).sum(-1)
            logits = weights.log() - 0.5 * sq / self.noise_scale**2
            distsvi.sample("z", dist.Categorical(logits=logits))

    def report(self, samples: dict[str, Tensor], x: Tensor, obs: Tensor) -> dict[str, float]:
        err = (samples["obs"].mean(0) - obs).pow(2).sum(-1).mean().sqrt()
        return {"held-out RMS error of the posterior predictive mean": float(err)}


class LocalNormal:
    """A latent ``z_i`` in R^D per datapoint, observed with Gaussian noise:
    ``z_i ~ Normal(0, prior_scale)``, ``x_i ~ Normal(z_i, noise_scale)``.

    Conjugate, so every row's exact posterior is known (:meth:`exact_posterior`); with a
    non-amortized guide (AutoNormal, AutoDelta) its params hold one row per datapoint.
    """

    local_sites = ("z",)

    def __init__(self, latent_dim: int = 10, prior_scale: float = 1.0, noise_scale: float = 0.5):
        self.dim, self.prior_scale, self.noise_scale = latent_dim, prior_scale, noise_scale

    def model(self, x, obs=None, *, size, subsample_size=None, subsample=None):
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (obs,) = rows(idx, subsample, obs)
            n = idx.shape[0]
            prior = dist.Normal(x.new_zeros(n, self.dim), self.prior_scale).to_event(1)
            z = distsvi.sample("z", prior)
            return distsvi.sample("obs", dist.Normal(z, self.noise_scale).to_event(1), obs=obs)

    def exact_posterior(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation of every ``z_i`` given its ``x_i``."""
        precision = self.prior_scale**-2 + self.noise_scale**-2
        mean = obs * self.noise_scale**-2 / precision
        return mean, torch.full_like(mean, precision**-0.5)

    def report(self, samples: dict[str, Tensor], x: Tensor, obs: Tensor) -> dict[str, float]:
        err = (samples["obs"].mean(0) - obs).pow(2).mean().sqrt()
        return {"held-out RMS error of the posterior predictive mean": float(err)}


class PoissonFactorization:
    """Poisson matrix factorization of counts, shaped like single-cell models: row ``i``
    (a cell) has ``num_factors`` latent factors ``theta_i``, the genes share loadings ``W``
    and a log mean ``b``; ``y_ig ~ Poisson(exp(theta_i @ W_g + b_g))``.

    ``theta`` is a per-datapoint latent: with AutoNormal or AutoDelta its params have one
    row per cell, the case ``optim.local_updates`` and ``dist.local_params`` are for.
    """

    local_sites = ("theta",)

    def __init__(self, num_genes: int = 200, num_factors: int = 8):
        self.num_genes, self.num_factors = num_genes, num_factors

    def model(self, counts, obs=None, *, size, subsample_size=None, subsample=None):
        k, g = self.num_factors, self.num_genes
        with distsvi.plate("genes", g, dim=-1):
            b = distsvi.sample("b", dist.Normal(counts.new_zeros(()), 3.0))
            with distsvi.plate("factors", k, dim=-2):
                w = distsvi.sample("W", dist.Normal(counts.new_zeros(()), k**-0.5))
        with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
            (obs,) = rows(idx, subsample, obs)
            n = idx.shape[0]
            theta = distsvi.sample(
                "theta", dist.Normal(counts.new_zeros(n, k), 1.0).to_event(1)
            )
            rate = (theta @ w + b).clamp(max=30.0).exp()
            return distsvi.sample("obs", dist.Poisson(rate).to_event(1), obs=obs)

    def report(self, samples: dict[str, Tensor], counts: Tensor, obs: Tensor) -> dict[str, float]:
        err = (samples["obs"].float().mean(0) - obs).abs().mean()
        return {"held-out mean absolute error of the predicted counts": float(err)}


BUILTIN = {
    "logistic_regression": LogisticRegression,
    "hierarchical": Hierarchical,
    "vae": VAE,
    "gmm": GaussianMixture,
    "local_normal": LocalNormal,
    "poisson_factorization": PoissonFactorization,
}

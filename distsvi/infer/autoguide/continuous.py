"""Guides over all latents at once: the model's latents, mapped to unconstrained space and
flattened, form one vector with a joint Gaussian posterior (Pyro's AutoContinuous family).

The vector is sampled as the auxiliary site ``"_<GuideName>_latent"``; each latent site is
then a ``Delta`` at its slice, mapped into the site's support with the Jacobian as its
log-density. These guides hold one set of params for the whole model, so they do not
support subsampled plates (use :class:`~distsvi.infer.autoguide.AutoNormal` there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributions import constraints

from ... import distributions as dist
from ... import primitives
from ...params import _PARAM_STORE
from .base import AutoGuide, _bijection, _constrained_delta, _in_plates
from .initialization import InitFn, init_to_median


class _Block:
    __slots__ = (
        "event_dim",
        "fn_event_dim",
        "name",
        "plate_dims",
        "pos",
        "shape",
        "size",
        "transform",
    )


class AutoContinuous(AutoGuide):
    """Base class: a posterior over the flattened unconstrained latents.

    :param model: the model.
    :param init_loc_fn: where the posterior's loc starts (default: the prior median).
    :param init_scale: initial posterior scale (> 0).
    """

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: InitFn = init_to_median,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
    ) -> None:
        super().__init__(model, create_plates=create_plates)
        self._set_init(init_loc_fn, init_scale)
        self._blocks: list[_Block] = []
        self._init_loc: torch.Tensor | None = None
        self._inits: dict = {}
        self.latent_dim = 0

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._blocks = []
        parts = []
        pos = 0
        for name, site in self._latent_sites():
            for f in site["cond_indep_stack"]:
                if f.size != f.full_size or f.name in self._probe_names:
                    raise NotImplementedError(
                        f"{type(self).__name__} does not support the subsampled plate "
                        f"{f.name!r} (site {name!r}); use AutoNormal or AutoDelta for local latents"
                    )
            fn, value = site["fn"], site["value"].detach()
            b = _Block()
            b.name = name
            b.fn_event_dim = len(fn.event_shape)
            b.transform = _bijection(site, self._pyro_name)
            u = b.transform.inv(value)
            b.event_dim = b.fn_event_dim + u.dim() - value.dim()
            b.shape = u.shape
            b.size = u.numel()
            b.pos = pos
            b.plate_dims = self._plate_dims(site, b.event_dim)
            pos += b.size
            parts.append(u.reshape(-1))
            self._blocks.append(b)
        self.latent_dim = pos
        self._init_loc = torch.cat(parts) if parts else torch.zeros(0)
        self._probe_names = frozenset()
        self._inits = self._initial_params()

    def _initial_params(self) -> dict[str, tuple[torch.Tensor, constraints.Constraint]]:
        """``{param suffix: (initial value, constraint)}``, made once after the prototype."""
        raise NotImplementedError

    def _param(self, name: str) -> torch.Tensor:
        init, constraint = self._inits[name]
        return primitives.param(f"{self._pyro_name}.{name}", init, constraint)

    def _store(self, name: str) -> torch.Tensor:
        init, constraint = self._inits[name]
        return _PARAM_STORE.get_param(f"{self._pyro_name}.{name}", init, constraint)

    def get_posterior(self, *args: Any, **kwargs: Any) -> torch.distributions.Distribution:
        """The posterior over the flattened unconstrained latents (a ``latent_dim`` vector)."""
        raise NotImplementedError

    def _loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's loc and marginal standard deviations."""
        raise NotImplementedError

    def _unpack(self, latent: torch.Tensor):
        """``(block, unconstrained value)`` per site; leading dims of ``latent`` (e.g.
        vectorized particles) broadcast with the site's own shape, as in Pyro."""
        batch_shape = latent.shape[:-1]
        for b in self._blocks:
            shape = torch.broadcast_shapes(b.shape, batch_shape + (1,) * b.event_dim)
            yield b, latent[..., b.pos : b.pos + b.size].reshape(shape)

    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        latent = primitives.sample(
            f"_{self._pyro_name}_latent",
            self.get_posterior(*args, **kwargs),
            infer={"is_auxiliary": True},
        )
        result = {}
        for b, u in self._unpack(latent):
            delta = _constrained_delta(b.transform, u, b.fn_event_dim)
            with _in_plates(plates, b.plate_dims):
                result[b.name] = primitives.sample(b.name, delta)
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        loc, _ = self._loc_scale()
        return {b.name: b.transform(u).detach().clone() for b, u in self._unpack(loc)}

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        self._ensure_prototype(args, kwargs)
        loc, scale = self._loc_scale()
        q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device).unsqueeze(-1)
        latents = torch.distributions.Normal(loc, scale).icdf(q)
        result: dict[str, list] = {}
        for latent in latents:
            for b, u in self._unpack(latent):
                result.setdefault(b.name, []).append(b.transform(u).detach())
        return {k: torch.stack(v) for k, v in result.items()}


class AutoDiagonalNormal(AutoContinuous):
    """A Normal posterior with diagonal covariance over all latents (unconstrained).

    Params: ``"AutoDiagonalNormal.loc"``, ``"AutoDiagonalNormal.scale"``.
    """

    def _initial_params(self):
        scale = self._init_loc.new_full((self.latent_dim,), self._init_scale)
        return {"loc": (self._init_loc, constraints.real), "scale": (scale, constraints.positive)}

    def get_posterior(self, *args: Any, **kwargs: Any):
        return dist.Normal(self._param("loc"), self._param("scale"), validate_args=False).to_event(
            1
        )

    def _loc_scale(self):
        return self._store("loc"), self._store("scale")


def _unit_lower(x: torch.Tensor) -> torch.Tensor:
    return x.tril(-1) + torch.eye(x.size(-1), dtype=x.dtype, device=x.device)


class AutoMultivariateNormal(AutoContinuous):
    """A full-covariance Normal posterior over all latents (unconstrained).

    The covariance's Cholesky factor is ``scale[:, None] * scale_tril`` with ``scale``
    positive and ``scale_tril`` unit lower triangular. Params: ``".loc"``, ``".scale"``,
    ``".scale_tril"`` under ``"AutoMultivariateNormal"``; ``scale_tril`` is stored as a
    plain matrix of which only the strict lower triangle is used (the other entries get
    no gradient and stay as initialised, at the identity's).
    """

    def _initial_params(self):
        d, loc = self.latent_dim, self._init_loc
        return {
            "loc": (loc, constraints.real),
            "scale": (loc.new_full((d,), self._init_scale), constraints.positive),
            "scale_tril": (torch.eye(d, dtype=loc.dtype, device=loc.device), constraints.real),
        }

    def get_posterior(self, *args: Any, **kwargs: Any):
        loc = self._param("loc")
        L = self._param("scale")[:, None] * _unit_lower(self._param("scale_tril"))
        return dist.MultivariateNormal(loc, scale_tril=L, validate_args=False)

    def _loc_scale(self):
        L = self._store("scale")[:, None] * _unit_lower(self._store("scale_tril"))
        return self._store("loc"), L.pow(2).sum(-1).sqrt()


class AutoLowRankMultivariateNormal(AutoContinuous):
    """A Normal posterior with low-rank plus diagonal covariance,
    ``cov_factor @ cov_factor.T + diag(scale**2)``, over all latents (unconstrained).

    :param rank: the rank of ``cov_factor`` (default ``round(sqrt(latent_dim))``).

    Params: ``".loc"``, ``".cov_factor"``, ``".scale"`` under ``"AutoLowRankMultivariateNormal"``.
    """

    def __init__(self, model: Callable, *, rank: int | None = None, **kwargs: Any) -> None:
        if rank is not None and not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        super().__init__(model, **kwargs)
        self.rank = rank

    def _initial_params(self):
        d, loc = self.latent_dim, self._init_loc
        rank = self.rank or max(1, round(math.sqrt(d)))
        # the initial variance init_scale**2 is split evenly between the two terms
        half = self._init_scale * 0.5**0.5
        factor = loc.new_empty(d, rank).normal_(0.0, half / rank**0.5)
        return {
            "loc": (loc, constraints.real),
            "cov_factor": (factor, constraints.real),
            "scale": (loc.new_full((d,), half), constraints.positive),
        }

    def get_posterior(self, *args: Any, **kwargs: Any):
        loc, factor, scale = self._param("loc"), self._param("cov_factor"), self._param("scale")
        return dist.LowRankMultivariateNormal(loc, factor, scale * scale, validate_args=False)

    def _loc_scale(self):
        factor, scale = self._store("cov_factor"), self._store("scale")
        return self._store("loc"), (factor.pow(2).sum(-1) + scale * scale).sqrt()

"""Guides over all latents at once: the model's latents, mapped to unconstrained space and
flattened, form one vector with a joint Gaussian posterior (Pyro's AutoContinuous family).

The vector is sampled as the auxiliary site ``"_<GuideName>_latent"``; each latent site is
then a ``Delta`` at its slice, mapped into the site's support with the Jacobian as its
log-density. These guides hold one set of params for the whole model, so they do not
support subsampled plates (use :class:`~distsvi.infer.autoguide.AutoNormal` there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributions.transforms import AffineTransform, Transform

from ... import constraints
from ... import distributions as dist
from ... import primitives
from ...params import _PARAM_STORE
from .base import AutoGuide, _bijection, _DeltaPlan, _in_plates
from .initialization import InitFn, init_to_median


class _Block:
    __slots__ = (
        "event_dim",
        "fn_event_dim",
        "name",
        "plan",
        "plate_dims",
        "pos",
        "shape",
        "size",
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
            transform = _bijection(site, self._pyro_name)
            u = transform.inv(value)
            b.plan = _DeltaPlan(transform, b.fn_event_dim, u)
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

    def __getattr__(self, name: str) -> torch.Tensor:
        # guide.loc, guide.scale, ...: the params by attribute, as on Pyro's autoguides
        if name in self.__dict__.get("_inits", {}):
            return self._param(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_base_dist(self) -> torch.distributions.Distribution:
        """The posterior's base distribution when written as
        ``TransformedDistribution(get_base_dist(), get_transform())``."""
        raise NotImplementedError(f"{type(self).__name__} has no base distribution")

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        """The transform applied to :meth:`get_base_dist` to give the posterior."""
        raise NotImplementedError(f"{type(self).__name__} has no transform")

    def get_posterior(self, *args: Any, **kwargs: Any) -> torch.distributions.Distribution:
        """The posterior over the flattened unconstrained latents (a ``latent_dim`` vector)."""
        return dist.TransformedDistribution(
            self.get_base_dist(), self.get_transform(*args, **kwargs)
        )

    def sample_latent(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Draw the flattened unconstrained latent vector (the auxiliary site)."""
        return primitives.sample(
            f"_{self._pyro_name}_latent",
            self.get_posterior(*args, **kwargs),
            infer={"is_auxiliary": True},
        )

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
        latent = self.sample_latent(*args, **kwargs)
        result = {}
        for b, u in self._unpack(latent):
            delta = b.plan.delta(u)
            with _in_plates(plates, b.plate_dims):
                result[b.name] = primitives.sample(b.name, delta)
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        loc, _ = self._loc_scale()
        return {b.name: b.plan.constrain(u).detach().clone() for b, u in self._unpack(loc)}

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        self._ensure_prototype(args, kwargs)
        loc, scale = self._loc_scale()
        q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device).unsqueeze(-1)
        latents = torch.distributions.Normal(loc, scale).icdf(q)
        result: dict[str, list] = {}
        for latent in latents:
            for b, u in self._unpack(latent):
                result.setdefault(b.name, []).append(b.plan.constrain(u).detach())
        return {k: torch.stack(v) for k, v in result.items()}


class AutoDiagonalNormal(AutoContinuous):
    """A Normal posterior with diagonal covariance over all latents (unconstrained).

    Params: ``"AutoDiagonalNormal.loc"``, ``"AutoDiagonalNormal.scale"`` (softplus_positive).
    """

    scale_constraint = constraints.softplus_positive

    def _initial_params(self):
        scale = self._init_loc.new_full((self.latent_dim,), self._init_scale)
        return {"loc": (self._init_loc, constraints.real), "scale": (scale, self.scale_constraint)}

    def get_base_dist(self):
        loc = self.loc
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any):
        return AffineTransform(self.loc, self.scale)

    def get_posterior(self, *args: Any, **kwargs: Any):
        return dist.Normal(self.loc, self.scale, validate_args=False).to_event(1)

    def _loc_scale(self):
        return self._store("loc"), self._store("scale")


class _LowerCholeskyAffine(Transform):
    """``x -> loc + scale_tril @ x`` on vectors (event dim 1)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__()
        self.loc, self.scale_tril = loc, scale_tril

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        d = (y - self.loc).unsqueeze(-1)
        return torch.linalg.solve_triangular(self.scale_tril, d, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ladj = self.scale_tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        return ladj.expand(x.shape[:-1])


class AutoMultivariateNormal(AutoContinuous):
    """A full-covariance Normal posterior over all latents (unconstrained).

    The covariance's Cholesky factor is ``scale[:, None] * scale_tril``, ``scale`` a
    ``softplus_positive`` vector and ``scale_tril`` a ``unit_lower_cholesky`` matrix, as in
    Pyro. Params: ``".loc"``, ``".scale"``, ``".scale_tril"`` under ``"AutoMultivariateNormal"``.
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky

    def _initial_params(self):
        d, loc = self.latent_dim, self._init_loc
        return {
            "loc": (loc, constraints.real),
            "scale": (loc.new_full((d,), self._init_scale), self.scale_constraint),
            "scale_tril": (
                torch.eye(d, dtype=loc.dtype, device=loc.device),
                self.scale_tril_constraint,
            ),
        }

    def get_base_dist(self):
        loc = self.loc
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any):
        return _LowerCholeskyAffine(self.loc, self.scale[..., None] * self.scale_tril)

    def get_posterior(self, *args: Any, **kwargs: Any):
        L = self.scale[..., None] * self.scale_tril
        return dist.MultivariateNormal(self.loc, scale_tril=L, validate_args=False)

    def _loc_scale(self):
        L = self._store("scale")[..., None] * self._store("scale_tril")
        return self._store("loc"), L.pow(2).sum(-1).sqrt()


class AutoLowRankMultivariateNormal(AutoContinuous):
    """A Normal posterior with low-rank plus diagonal covariance over all latents
    (unconstrained), parameterised as in Pyro: with ``s = scale`` (softplus_positive),
    ``cov = (cov_factor * s[:, None]) @ (cov_factor * s[:, None]).T + diag(s**2)``.

    :param rank: the rank of ``cov_factor`` (default ``round(sqrt(latent_dim))``).

    Params: ``".loc"``, ``".cov_factor"``, ``".scale"`` under ``"AutoLowRankMultivariateNormal"``.
    """

    scale_constraint = constraints.softplus_positive

    def __init__(self, model: Callable, *, rank: int | None = None, **kwargs: Any) -> None:
        if rank is not None and not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        super().__init__(model, **kwargs)
        self.rank = rank

    def _initial_params(self):
        d, loc = self.latent_dim, self._init_loc
        if self.rank is None:
            self.rank = max(1, round(d**0.5))
        # init_scale**2 splits evenly between the diagonal and (on average) the low-rank part
        scale = loc.new_full((d,), 0.5**0.5 * self._init_scale)
        factor = loc.new_empty(d, self.rank).normal_(0, 1 / self.rank**0.5)
        return {
            "loc": (loc, constraints.real),
            "scale": (scale, self.scale_constraint),
            "cov_factor": (factor, constraints.real),
        }

    def get_posterior(self, *args: Any, **kwargs: Any):
        scale = self.scale
        factor = self.cov_factor * scale.unsqueeze(-1)
        return dist.LowRankMultivariateNormal(self.loc, factor, scale * scale, validate_args=False)

    def _loc_scale(self):
        factor, scale = self._store("cov_factor"), self._store("scale")
        return self._store("loc"), scale * (factor.pow(2).sum(-1) + 1).sqrt()

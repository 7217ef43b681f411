"""AutoNormal, AutoDelta and AutoGuideList (see :mod:`.base` for the shared machinery:
prototype, plates, subsampling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributions import constraints

from ... import distributions as dist
from ... import primitives
from ...params import _PARAM_STORE
from .base import (
    AutoGuide,
    _bijection,
    _constrained_delta,
    _in_plates,
    _is_real,
    _select,
    _subsampled,
)
from .initialization import InitFn, init_to_feasible, init_to_median


class _NormalSite:
    __slots__ = (
        "event_dim",
        "fn_event_dim",
        "init_loc",
        "init_scale",
        "loc",
        "name",
        "plate_dims",
        "scale",
        "transform",
    )


class AutoNormal(AutoGuide):
    """A mean-field Normal guide in unconstrained space, one ``loc``/``scale`` per site.

    Params are ``"AutoNormal.locs.<site>"`` and ``"AutoNormal.scales.<site>"``. A site with
    real support is sampled directly from its Normal; any other site is sampled as the
    auxiliary ``"<site>_unconstrained"`` and mapped into its support by a ``Delta``
    carrying the Jacobian, as in Pyro. Scales are ``constraints.positive`` params (stored as
    their log; Pyro uses a softplus), so a saved store holds only torch's constraints.
    Under :class:`~distsvi.infer.TraceMeanField_ELBO` the real sites thus get the analytic
    KL divergence, where Pyro's AutoNormal estimates it by sampling.

    :param model: the model.
    :param init_loc_fn: where the locs start (an ``init_to_*`` strategy).
    :param init_scale: the initial scale (> 0) of every site.
    :param create_plates: see :class:`AutoGuide`.

    Example::

        guide = AutoNormal(model)
        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    """

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: InitFn = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
    ) -> None:
        super().__init__(model, create_plates=create_plates)
        self._set_init(init_loc_fn, init_scale)
        self._sites: list[_NormalSite] = []

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._sites = []
        for name, site in self._latent_sites():
            fn, value = site["fn"], site["value"].detach()
            s = _NormalSite()
            s.name = name
            s.loc = f"{self._pyro_name}.locs.{name}"
            s.scale = f"{self._pyro_name}.scales.{name}"
            s.fn_event_dim = len(fn.event_shape)
            s.transform = None if _is_real(fn.support) else _bijection(site, self._pyro_name)
            u = value if s.transform is None else s.transform.inv(value)
            s.event_dim = s.fn_event_dim + u.dim() - value.dim()
            s.init_loc = self._full_size(u, site, s.event_dim)
            s.init_scale = torch.full_like(s.init_loc, self._init_scale)
            s.plate_dims = self._plate_dims(site, s.event_dim)
            self._sites.append(s)

    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        param, sample = primitives.param, primitives.sample
        subsampled = _subsampled(plates)
        result = {}
        for s in self._sites:
            # No event_dim here: the rows are selected below, by this call's plates, so an
            # enclosing subsampled plate must not select them too.
            loc = param(s.loc, s.init_loc)
            scale = param(s.scale, s.init_scale, constraints.positive)
            if subsampled:
                loc = _select(loc, s.plate_dims, plates, subsampled)
                scale = _select(scale, s.plate_dims, plates, subsampled)
            q = dist.Normal(loc, scale, validate_args=False).to_event(s.event_dim)
            with _in_plates(plates, s.plate_dims):
                if s.transform is None:
                    result[s.name] = sample(s.name, q)
                    continue
                u = sample(s.name + "_unconstrained", q, infer={"is_auxiliary": True})
                result[s.name] = sample(s.name, _constrained_delta(s.transform, u, s.fn_event_dim))
        return result

    def _loc_scale(self, s: _NormalSite) -> tuple[torch.Tensor, torch.Tensor]:
        loc = _PARAM_STORE.get_param(s.loc, s.init_loc, event_dim=s.event_dim)
        scale = _PARAM_STORE.get_param(s.scale, s.init_scale, constraints.positive, s.event_dim)
        return loc, scale

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        result = {}
        for s in self._sites:
            loc, _ = self._loc_scale(s)
            result[s.name] = loc.detach().clone() if s.transform is None else s.transform(loc)
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        self._ensure_prototype(args, kwargs)
        result = {}
        for s in self._sites:
            loc, scale = self._loc_scale(s)
            q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device)
            u = torch.distributions.Normal(loc, scale).icdf(q.reshape((-1,) + (1,) * loc.dim()))
            result[s.name] = u if s.transform is None else s.transform(u)
        return result


class _DeltaSite:
    __slots__ = ("event_dim", "init", "name", "param", "plate_dims", "support")


class AutoDelta(AutoGuide):
    """A point-mass guide (MAP estimation): one param ``"AutoDelta.<site>"`` per site,
    constrained to the site's support.

    :param model: the model.
    :param init_loc_fn: where the points start (default: the prior median).
    :param create_plates: see :class:`AutoGuide`.
    """

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: InitFn = init_to_median,
        create_plates: Callable | None = None,
    ) -> None:
        super().__init__(model, create_plates=create_plates)
        self.init_loc_fn = init_loc_fn
        self._sites: list[_DeltaSite] = []

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._sites = []
        for name, site in self._latent_sites():
            s = _DeltaSite()
            s.name = name
            s.param = f"{self._pyro_name}.{name}"
            _bijection(site, self._pyro_name)  # a discrete site fails here, with a clear error
            s.support = site["fn"].support
            s.event_dim = len(site["fn"].event_shape)
            s.init = self._full_size(site["value"].detach(), site, s.event_dim)
            s.plate_dims = self._plate_dims(site, s.event_dim)
            self._sites.append(s)

    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        subsampled = _subsampled(plates)
        result = {}
        for s in self._sites:
            value = primitives.param(s.param, s.init, s.support)  # rows selected below
            if subsampled:
                value = _select(value, s.plate_dims, plates, subsampled)
            with _in_plates(plates, s.plate_dims):
                result[s.name] = primitives.sample(s.name, dist.Delta(value, event_dim=s.event_dim))
        return result

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        return {
            s.name: _PARAM_STORE.get_param(s.param, s.init, s.support, s.event_dim).detach().clone()
            for s in self._sites
        }

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        median = self.median(*args, **kwargs)
        return {k: v.expand((len(quantiles),) + v.shape).clone() for k, v in median.items()}


class AutoGuideList(AutoGuide):
    """A guide made of parts, each for some of the model's sites (Pyro's AutoGuideList).

    Parts are autoguides of the model with the other sites hidden (``poutine.block``), or
    plain guide functions. The list opens the plates once and shares them with its parts,
    so all parts use the same subsample. Part ``i``'s params are named
    ``"AutoGuideList.<i>.<...>"``.

    Example::

        guide = AutoGuideList(model)
        guide.append(AutoNormal(poutine.block(model, hide=["z"])))
        guide.append(AutoDelta(poutine.block(model, expose=["z"])))
    """

    def __init__(self, model: Callable, *, create_plates: Callable | None = None) -> None:
        super().__init__(model, create_plates=create_plates)
        self.parts: list = []

    def append(self, part: Any) -> None:
        """Add an autoguide or a guide function for part of the model."""
        if isinstance(part, AutoGuide):
            if part._parent is not None:
                raise RuntimeError(
                    f"{part._pyro_name} is already part of {part._parent._pyro_name}"
                )
            if part.prototype_trace is not None:
                raise RuntimeError(
                    "append a part before it is first called (its params take the list's name)"
                )
            part._parent = self
            part._pyro_name = f"{self._pyro_name}.{len(self.parts)}"
        elif not callable(part):
            raise TypeError(f"AutoGuideList parts must be autoguides or callables, got {part!r}")
        self.parts.append(part)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> Any:
        return self.parts[i]

    def __iter__(self):
        return iter(self.parts)

    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        result: dict = {}
        for part in self.parts:
            if isinstance(part, AutoGuide):
                part._ensure_prototype(args, kwargs)
                result.update(part._forward(plates, args, kwargs))
            else:
                result.update(part(*args, **kwargs) or {})
        return result

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        result: dict = {}
        for part in self.parts:
            if isinstance(part, AutoGuide):
                result.update(part.median(*args, **kwargs))
        return result

    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        self._ensure_prototype(args, kwargs)
        result: dict = {}
        for part in self.parts:
            if isinstance(part, AutoGuide):
                result.update(part.quantiles(quantiles, *args, **kwargs))
        return result

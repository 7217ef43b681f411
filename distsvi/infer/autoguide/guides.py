"""AutoNormal, AutoDelta and AutoGuideList (see :mod:`.base` for the shared machinery:
prototype, plates, subsampling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ... import constraints
from ... import distributions as dist
from ... import primitives
from ...params import _PARAM_STORE
from .base import (
    AutoGuide,
    _bijection,
    _DeltaPlan,
    _in_plates,
    _normal,
    _select,
    _subsampled,
)
from .initialization import InitFn, init_to_feasible, init_to_median


def _local(name, init, constraint, plate_dims, plates, subsampled) -> torch.Tensor:
    """A site's param at this subsample's rows: an SVI step reads just those rows (see
    :mod:`distsvi.params.rows`); any other read takes the whole param and selects."""
    picks = [
        (dim, plates[n].indices, plates[n].size, n) for n, dim in plate_dims if n in subsampled
    ]
    if constraint is None:
        constraint = constraints.real
    value, done = primitives._param_rows(name, init, constraint, picks)
    return value if done else _select(value, plate_dims, plates, subsampled)


class _NormalSite:
    __slots__ = (
        "aux",
        "event_dim",
        "init_loc",
        "init_scale",
        "loc",
        "name",
        "plan",
        "plate_dims",
        "scale",
    )


_AUX = {"is_auxiliary": True}


class _SiteParams:
    """``guide.locs.<site>`` / ``guide.scales.<site>``: a site's param by attribute, as on
    Pyro's AutoNormal (a dotted site name ``"a.b"`` reads as ``guide.locs.a.b``)."""

    def __init__(self, guide: AutoNormal, kind: str, prefix: str = "") -> None:
        self._guide, self._kind, self._prefix = guide, kind, prefix

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        full = self._prefix + name
        sites = {s.name: s for s in self._guide._sites}
        if full in sites:
            return self._guide._site_param(sites[full], self._kind)
        if any(n.startswith(full + ".") for n in sites):
            return _SiteParams(self._guide, self._kind, full + ".")
        raise AttributeError(
            f"{self._guide._pyro_name}.{self._kind} has no site {full!r} (sites: {sorted(sites)})"
        )

    def __dir__(self):
        return [s.name for s in self._guide._sites]


class AutoNormal(AutoGuide):
    """A mean-field Normal guide in unconstrained space, one ``loc``/``scale`` per site.

    Params are ``"AutoNormal.locs.<site>"`` and ``"AutoNormal.scales.<site>"`` (read them as
    ``guide.locs.<site>``, ``guide.scales.<site>``); scales are
    ``constraints.softplus_positive`` params, as in Pyro. The trace has Pyro's structure:
    each site is drawn as the auxiliary ``"<site>_unconstrained"`` from its Normal and
    mapped into the site's support by a ``Delta`` whose log-density is the Jacobian (zero
    for a site with real support). So under
    :class:`~distsvi.infer.TraceMeanField_ELBO` the KL is estimated by sampling, as with
    Pyro's AutoNormal.

    :param model: the model.
    :param init_loc_fn: where the locs start (an ``init_to_*`` strategy).
    :param init_scale: the initial scale (> 0) of every site.
    :param create_plates: see :class:`AutoGuide`.

    Example::

        guide = AutoNormal(model)
        svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    """

    scale_constraint = constraints.softplus_positive

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
        self.locs = _SiteParams(self, "locs")
        self.scales = _SiteParams(self, "scales")

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._sites = []
        for name, site in self._latent_sites():
            fn, value = site["fn"], site["value"].detach()
            s = _NormalSite()
            s.name = name
            s.aux = name + "_unconstrained"
            s.loc = f"{self._pyro_name}.locs.{name}"
            s.scale = f"{self._pyro_name}.scales.{name}"
            transform = _bijection(site, self._pyro_name)
            u = transform.inv(value)
            s.event_dim = len(fn.event_shape) + u.dim() - value.dim()
            s.init_loc = self._full_size(u, site, s.event_dim)
            s.init_scale = torch.full_like(s.init_loc, self._init_scale)
            s.plate_dims = self._plate_dims(site, s.event_dim)
            s.plan = _DeltaPlan(transform, len(fn.event_shape), s.init_loc)
            self._sites.append(s)

    def _site_param(self, s: _NormalSite, kind: str) -> torch.Tensor:
        if kind == "locs":
            return primitives.param(s.loc, s.init_loc)
        return primitives.param(s.scale, s.init_scale, self.scale_constraint)

    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        param, sample = primitives.param, primitives.sample
        subsampled = _subsampled(plates)
        scale_constraint = self.scale_constraint
        result = {}
        for s in self._sites:
            # No event_dim here: the rows are selected below, by this call's plates, so an
            # enclosing subsampled plate must not select them too.
            if subsampled:
                loc = _local(s.loc, s.init_loc, None, s.plate_dims, plates, subsampled)
                scale = _local(
                    s.scale, s.init_scale, scale_constraint, s.plate_dims, plates, subsampled
                )
            else:
                loc = param(s.loc, s.init_loc)
                scale = param(s.scale, s.init_scale, scale_constraint)
            q = _normal(loc, scale).to_event(s.event_dim)
            with _in_plates(plates, s.plate_dims):
                u = sample(s.aux, q, infer=_AUX)
                result[s.name] = sample(s.name, s.plan.delta(u))
        return result

    def _loc_scale(self, s: _NormalSite) -> tuple[torch.Tensor, torch.Tensor]:
        loc = _PARAM_STORE.get_param(s.loc, s.init_loc, event_dim=s.event_dim)
        scale = _PARAM_STORE.get_param(s.scale, s.init_scale, self.scale_constraint, s.event_dim)
        return loc, scale

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._ensure_prototype(args, kwargs)
        result = {}
        for s in self._sites:
            loc, _ = self._loc_scale(s)
            result[s.name] = (
                loc.detach().clone() if s.plan.transform is None else s.plan.constrain(loc)
            )
        return result

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        self._ensure_prototype(args, kwargs)
        result = {}
        for s in self._sites:
            loc, scale = self._loc_scale(s)
            q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device)
            u = torch.distributions.Normal(loc, scale).icdf(q.reshape((-1,) + (1,) * loc.dim()))
            result[s.name] = s.plan.constrain(u)
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
            if subsampled:
                value = _local(s.param, s.init, s.support, s.plate_dims, plates, subsampled)
            else:
                value = primitives.param(s.param, s.init, s.support)
            with _in_plates(plates, s.plate_dims):
                result[s.name] = primitives.sample(s.name, dist.Delta(value, event_dim=s.event_dim))
        return result

    def __getattr__(self, name: str) -> torch.Tensor:
        # guide.<site>: the site's point, as on Pyro's AutoDelta
        for s in self.__dict__.get("_sites", ()):
            if s.name == name:
                return primitives.param(s.param, s.init, s.support)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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

"""The machinery shared by the automatic guides: prototype, plates, subsampling.

An autoguide runs the model once (its *prototype*, on the first call) to learn the latent
sites, their supports, shapes and the plates around them; it then creates its params
lazily, under Pyro's names (``AutoNormal.locs.z``, ``AutoDelta.z``, ...), and on every
later call samples each latent site from them with no further look at the model's sites.

Subsampling. A latent inside a subsampled plate gets per-datapoint params of the plate's
*full* size, and each call reads only the rows of the current subsample (``index_select``),
so the gradient is exactly zero on every other row. The guide always uses the *model's*
indices: on each call it runs the model only until the model has created its subsampled
plates (a cheap probe that stops there and draws nothing), reads their sizes and any
explicit ``subsample=`` indices, and opens the same plates itself. Indices the model draws
are then drawn by the guide's plate (through :class:`~distsvi.primitives.plate`, so any
handler that fills subsample messages, e.g. a rank's data shard, sees them) and replayed
into the model; indices the model passes explicitly are used by both. The subsample size
may change from call to call. A ``create_plates(*args, **kwargs)`` callable (Pyro's
argument) replaces the probe for the plates it returns. The probe runs the model's code
up to its last subsampled plate once more per step, so that code should have no side
effects beyond distsvi's primitives (it usually just reads its arguments).

What "only the rows of the subsample" guarantees under an optimizer: rows outside the
subsample get an exactly zero gradient. With SGD, or with Adam for a row that has never
been in a subsample (its moments are still zero), such a row stays bit-identical. A row
that was in an earlier subsample keeps moving by Adam's momentum, as with torch's Adam
(and Pyro's) on any param whose gradient is zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch.distributions import biject_to, constraints

from ... import distributions as dist
from ... import primitives
from ...params import get_param_store
from ...poutine import handlers as poutine
from ...poutine.runtime import Messenger
from .initialization import InitFn, InitMessenger


class _ProbeDone(BaseException):
    """Raised inside the model to stop the probe once every plate it needs exists.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


class _PlateProbe(Messenger):
    """Run a model only far enough to see how it opens the plates named in ``names``.

    Every message is stopped here, so nothing reaches the handlers outside (the ELBO's
    traces, a data-shard handler); sample sites outside any plate take their prototype
    value and subsample messages get a placeholder, so the probe draws no random numbers
    in the usual model, where plates are opened before any local site.
    """

    def __init__(self, names: frozenset, values: dict) -> None:
        super().__init__(None)
        self.names = names
        self.values = values
        self.found: dict[str, tuple] = {}

    def process_message(self, msg: dict) -> None:
        msg["stop"] = True
        kind = msg["type"]
        if kind == "subsample":
            size, subsample_size = msg["kwargs"]["size"], msg["kwargs"]["subsample_size"]
            if msg["name"] in self.names:
                self.found[msg["name"]] = (msg["value"], size, subsample_size)
                if len(self.found) == len(self.names):
                    raise _ProbeDone
            if msg["value"] is None:
                msg["value"] = torch.arange(subsample_size)
        elif kind == "sample" and msg["value"] is None and not msg["cond_indep_stack"]:
            value = self.values.get(msg["name"])
            if value is not None:
                msg["value"] = value
                msg["done"] = True


def _bijection(site: dict, guide: str) -> Any:
    """The map from unconstrained space onto the site's support, or a clear error."""
    try:
        return biject_to(site["fn"].support)
    except NotImplementedError:
        raise ValueError(
            f"{guide} cannot guide site {site['name']!r}: its support {site['fn'].support} is "
            "not continuous. Hide the site from the autoguide (poutine.block) and give it a "
            "guide of its own, e.g. with AutoGuideList."
        ) from None


def _sum_rightmost(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.sum(tuple(range(-n, 0))) if n > 0 else x


def _identity(transform: Any) -> bool:
    """Whether ``transform`` is torch's identity map (what ``biject_to(real)`` returns)."""
    T = torch.distributions.transforms
    while isinstance(transform, T.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, T.ComposeTransform) and not transform.parts


def _unit_shift_after_exp(transform: Any) -> float | None:
    """``c`` when ``transform`` is ``exp`` (``c = 0``) or ``exp`` then ``x + c`` with a number
    ``c`` (torch's ``biject_to`` of ``greater_than(c)``); ``None`` for any other map."""
    T = torch.distributions.transforms
    if type(transform) is T.ExpTransform:
        return 0.0
    if type(transform) is not T.ComposeTransform or len(transform.parts) != 2:
        return None
    exp, shift = transform.parts
    if type(exp) is not T.ExpTransform or type(shift) is not T.AffineTransform:
        return None
    if not isinstance(shift.loc, (int, float)) or not isinstance(shift.scale, (int, float)):
        return None
    return float(shift.loc) if shift.scale == 1 else None


class _DeltaPlan:
    """How one latent site's unconstrained draw becomes its value and ``Delta`` site,
    worked out once (after the prototype) so that each call does only the tensor work.

    For a site with real support the map is the identity: the value is the draw itself and
    the ``Delta``'s log-density a constant zero (no transform, no Jacobian kernels).
    """

    __slots__ = ("fn_event_dim", "shift", "transform", "zero")

    def __init__(self, transform: Any, fn_event_dim: int, like: torch.Tensor) -> None:
        self.transform = None if _identity(transform) else transform
        # The positive sites' map (Gamma, LogNormal, ...): exp, whose Jacobian back is
        # log|d log(y)/dy| = -u exactly, written out to skip the transform machinery. The
        # half-line [c, inf) (HalfCauchy, HalfNormal: c = 0) is exp then a shift by c, with
        # the same Jacobian: the unit-scale shift adds log 1 = 0.
        self.shift = _unit_shift_after_exp(self.transform)
        self.fn_event_dim = fn_event_dim
        self.zero = like.new_zeros(())

    def delta(self, u: torch.Tensor) -> Any:
        """A ``Delta`` at ``transform(u)`` whose log-density is the Jacobian of the map back."""
        t = self.transform
        if t is None:
            d = dist.Delta(u, self.zero, event_dim=self.fn_event_dim)
            d._zero_sum = self.zero
            return d
        if self.shift is not None:
            value = u.exp() if self.shift == 0 else u.exp() + self.shift
            return dist.Delta(
                value, _sum_rightmost(-u, self.fn_event_dim), event_dim=self.fn_event_dim
            )
        value = t(u)
        log_density = t.inv.log_abs_det_jacobian(value, u)
        n = log_density.dim() - value.dim() + self.fn_event_dim
        return dist.Delta(value, _sum_rightmost(log_density, n), event_dim=self.fn_event_dim)

    def constrain(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.transform is None else self.transform(u)


def _normal(loc: torch.Tensor, scale: torch.Tensor) -> Any:
    """``Normal(loc, scale)`` for a guide's own params, which have one shape and valid values
    by construction: made without ``broadcast_all`` and argument checks, a few times faster
    to build (the same distribution; a compiled step builds it the usual way)."""
    if loc.shape != scale.shape or torch.compiler.is_compiling():
        return dist.Normal(loc, scale, validate_args=False)
    q = dist.Normal.__new__(dist.Normal)
    q.loc, q.scale = loc, scale
    torch.distributions.Distribution.__init__(q, loc.shape, validate_args=False)
    return q


def _periodic_repeat(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Tile ``x`` along ``dim`` up to length ``size`` (a subsample's init to full size)."""
    n = x.size(dim)
    if n == size:
        return x
    reps = [1] * x.dim()
    reps[dim] = math.ceil(size / n)
    return x.repeat(reps).narrow(dim, 0, size)


class AutoGuide:
    """Base class of the automatic guides: prototype, plates and subsampling.

    :param model: the model; the guide is called with the model's arguments.
    :param create_plates: optional ``fn(*args, **kwargs) -> plate or list of plates``
        that opens the model's subsampled plates for the guide (instead of probing the
        model for them each call).
    """

    init_loc_fn: InitFn | None = None

    def __init__(self, model: Callable, *, create_plates: Callable | None = None) -> None:
        self.model = model
        self.create_plates = create_plates
        self._pyro_name = type(self).__name__
        self._parent: AutoGuide | None = None
        self.prototype_trace = None
        self._frames: dict[str, Any] = {}
        self._probe_names: frozenset = frozenset()
        self._global_values: dict[str, torch.Tensor] = {}

    def _set_init(self, init_loc_fn: Callable, init_scale: float) -> None:
        """Store the init strategy and the initial scale shared by the Gaussian guides."""
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.init_loc_fn = init_loc_fn
        self._init_scale = init_scale

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Sample every latent site of the model; returns ``{name: value}``."""
        self._ensure_prototype(args, kwargs)
        return self._forward(self._create_plates(args, kwargs), args, kwargs)

    forward = __call__

    def call(self, *args: Any, **kwargs: Any) -> tuple:
        """The guide's values as a tuple sorted by site name (Pyro's ``AutoGuide.call``)."""
        result = self(*args, **kwargs)
        return tuple(v for _, v in sorted(result.items()))

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        """``(name, unconstrained leaf)`` of this guide's params in the param store (Pyro's
        autoguides are modules; scripts call ``parameters()`` and ``requires_grad_()``)."""
        prefix = f"{self._pyro_name}."
        return [(n, p) for n, p in get_param_store().named_parameters() if n.startswith(prefix)]

    def parameters(self) -> Iterable[torch.Tensor]:
        return [p for _, p in self.named_parameters()]

    def requires_grad_(self, requires_grad: bool = True) -> AutoGuide:
        """Turn gradients of this guide's params on or off, as ``nn.Module.requires_grad_``."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def sample_latent(self, *args: Any, **kwargs: Any) -> Any:
        """Pyro's hook for guides with one latent vector; the others have none."""
        return None

    # structure -------------------------------------------------------------------------
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        with poutine.block(), torch.no_grad():  # invisible to the handlers outside
            tracer = poutine.trace()
            with tracer:
                if self.init_loc_fn is None:
                    self.model(*args, **kwargs)
                else:
                    with InitMessenger(self.init_loc_fn):
                        self.model(*args, **kwargs)
        trace = tracer.trace
        self.prototype_trace = trace
        frames: dict[str, Any] = {}
        for name, site in self._latent_sites():
            for f in site["cond_indep_stack"]:
                if f.dim is None:
                    raise NotImplementedError(
                        f"{type(self).__name__} does not support the sequential plate "
                        f"{f.name!r} around site {name!r}: use a vectorized plate "
                        "(`with plate(...)`) or write this part of the guide by hand"
                    )
                frames.setdefault(f.name, f)
            if not site["cond_indep_stack"]:
                self._global_values[name] = site["value"]
        self._frames = frames
        # Plates that subsample (fewer indices than the plate, or an explicit order of them);
        # a plate that just announces all of its indices in order needs no probe.
        subsampled = {
            n
            for n, s in trace.nodes.items()
            if s["type"] == "subsample"
            and (
                len(s["value"]) < s["kwargs"]["size"]
                or not torch.equal(s["value"].cpu(), torch.arange(s["kwargs"]["size"]))
            )
        }
        self._probe_names = frozenset(
            n for n, f in frames.items() if n in subsampled or f.size != f.full_size
        )

    def _latent_sites(self) -> Iterable[tuple[str, dict]]:
        for name, site in self.prototype_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not site["infer"].get("is_auxiliary")
            ):
                yield name, site

    def _create_plates(self, args: tuple, kwargs: dict) -> dict:
        """Open (construct) the plates of this call, with the model's current indices."""
        plates: dict = {}
        if self.create_plates is not None:
            user = self.create_plates(*args, **kwargs)
            for p in [user] if isinstance(user, primitives.plate) else user:
                plates[p.name] = p
        need = self._probe_names.difference(plates)
        found = self._probe(need, args, kwargs) if need else {}
        for name, frame in self._frames.items():
            if name in plates:
                continue
            got = found.get(name)
            if got is None:
                subsample_size = frame.size if name in self._probe_names else None
                plates[name] = primitives.plate(
                    name, frame.full_size, subsample_size=subsample_size, dim=frame.dim
                )
                continue
            value, size, subsample_size = got
            if size != frame.full_size:
                raise ValueError(
                    f"plate {name!r} has size {size} now but had {frame.full_size} when "
                    f"{self._pyro_name} created its per-datapoint params; the full size of a "
                    "subsampled plate must stay fixed (pass the full N, subsample with "
                    "subsample_size= or subsample=)"
                )
            if value is None:
                plates[name] = primitives.plate(name, size, subsample_size, dim=frame.dim)
            else:
                plates[name] = primitives.plate(name, size, subsample=value, dim=frame.dim)
        return plates

    def _probe(self, names: frozenset, args: tuple, kwargs: dict) -> dict:
        probe = _PlateProbe(names, self._global_values)
        try:
            with torch.no_grad(), probe:
                self.model(*args, **kwargs)
        except _ProbeDone:
            return probe.found
        missing = sorted(names.difference(probe.found))
        warnings.warn(
            f"{self._pyro_name} did not see the model open plate(s) {missing} this call (a "
            "handler inside the model may hide them), so it drew its own indices; pass "
            "create_plates= to give the guide the model's plates",
            stacklevel=4,
        )
        return probe.found

    def _plate_dims(self, site: dict, event_dim: int) -> tuple[tuple[str, int], ...]:
        """``(plate name, dim of a param with event_dim event dims)`` for each plate."""
        return tuple((f.name, f.dim - event_dim) for f in site["cond_indep_stack"])

    def _full_size(self, x: torch.Tensor, site: dict, event_dim: int) -> torch.Tensor:
        for f in site["cond_indep_stack"]:
            if f.size != f.full_size:
                x = _periodic_repeat(x, f.full_size, f.dim - event_dim)
        return x.contiguous()

    # subclasses ------------------------------------------------------------------------
    def _forward(self, plates: dict, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The posterior median of each latent site, at full (not subsampled) size."""
        raise NotImplementedError

    def quantiles(self, quantiles: list[float], *args: Any, **kwargs: Any) -> dict:
        """Marginal quantiles of each latent site, stacked along a new leading dim."""
        raise NotImplementedError

    def _ensure_prototype(self, args: tuple, kwargs: dict) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)


def _subsampled(plates: dict) -> set:
    """The plates whose sites see only some rows (or rows in another order)."""
    return {n for n, p in plates.items() if p._subsampled}


def _select(x: torch.Tensor, plate_dims: tuple, plates: dict, subsampled: set) -> torch.Tensor:
    for name, dim in plate_dims:
        if name in subsampled:
            x = x.index_select(dim, plates[name].indices)
    return x


_NO_PLATES = nullcontext()


def _in_plates(plates: dict, plate_dims: tuple) -> Any:
    """A context that enters the site's plates (most sites have none or one)."""
    if not plate_dims:
        return _NO_PLATES
    if len(plate_dims) == 1:
        return plates[plate_dims[0][0]]
    stack = ExitStack()
    try:
        for name, _ in plate_dims:
            stack.enter_context(plates[name])
    except BaseException:
        stack.close()
        raise
    return stack

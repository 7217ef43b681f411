"""torch.distributions with Pyro's conveniences: ``.to_event``, ``.mask``, ``.expand_by``.

Every class of :mod:`torch.distributions` is re-exported here as a subclass that adds
:class:`DistributionMixin`, so ``dist.Normal(0, 1).expand([3]).to_event(1)`` works as in
Pyro. Any other :class:`torch.distributions.Distribution` (Pyro's own included) can still
be passed to :func:`distsvi.sample`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
import torch.distributions as _td
from torch.distributions import kl_divergence as _torch_kl
from torch.distributions import register_kl
from torch.distributions.utils import _standard_normal, broadcast_all

from . import constraints  # torch's constraints plus Pyro's softplus_positive, ...

__all__ = ["Delta", "DistributionMixin", "MaskedDistribution", "constraints", "kl_divergence"]

_NO_SHAPE = torch.Size()


class DistributionMixin:
    """Pyro's shape helpers, added to every distribution class of this module."""

    def __call__(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return self.rsample(sample_shape) if self.has_rsample else self.sample(sample_shape)

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> _td.Distribution:
        """Treat the rightmost ``n`` batch dims as event dims (all of them when ``None``)."""
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self
        return Independent(self, reinterpreted_batch_ndims)

    def expand_by(self, sample_shape: tuple[int, ...] | torch.Size) -> _td.Distribution:
        """Expand the batch shape by ``sample_shape`` on the left."""
        return self.expand(torch.Size(sample_shape) + self.batch_shape)

    def mask(self, mask: bool | torch.Tensor) -> _td.Distribution:
        """Zero the log-density where ``mask`` is False (``mask`` broadcasts to batch shape)."""
        if isinstance(mask, bool) and mask:
            return self
        return MaskedDistribution(self, mask)

    def shape(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Size:
        return torch.Size(sample_shape) + self.batch_shape + self.event_shape

    def has_rsample_(self, value: bool) -> _td.Distribution:
        """Force reparameterised (``True``) or detached (``False``) sampling of this one
        instance, in place (Pyro's); returns it."""
        if value is not True and value is not False:
            raise ValueError(f"has_rsample_ takes True or False, got {value!r}")
        if isinstance(getattr(type(self), "has_rsample", None), property):
            self.base_dist.has_rsample_(value)  # a wrapper (Independent, masked) asks its base
        else:
            self.has_rsample = value
        return self


def _export(cls: type) -> type:
    if DistributionMixin in cls.__mro__:
        return cls
    return type(cls.__name__, (cls, DistributionMixin), {"__module__": __name__})


_namespace = globals()
for _name in _td.__all__:
    _cls = getattr(_td, _name)
    if inspect.isclass(_cls) and issubclass(_cls, _td.Distribution):
        _namespace[_name] = _export(_cls)
        __all__.append(_name)

Independent: type = _namespace["Independent"]  # what DistributionMixin.to_event builds


# Normal, HalfNormal and HalfCauchy, the distributions most sites use, score with fewer
# kernels than torch's formulas (the same functions; they differ from torch only in rounding).
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _expand_keeping(d: Any, cls: type, batch_shape: Any, instance: Any, attr: str) -> Any:
    """torch's ``expand`` for ``cls``, building the subclass and keeping ``attr``."""
    new = super(cls, d).expand(batch_shape, d.__new__(type(d)) if instance is None else instance)
    setattr(new, attr, getattr(d, attr))
    return new


def _covers(value: Any, batch_shape: torch.Size) -> bool:
    """Whether ``value``'s shape already is its broadcast with ``batch_shape`` (so a formula
    in Python-number parameters gives torch's shape)."""
    if not isinstance(value, torch.Tensor):
        return False
    n = len(batch_shape)
    return n == 0 or (value.dim() >= n and value.shape[value.dim() - n :] == batch_shape)


class Normal(_td.Normal, DistributionMixin):
    """torch's ``Normal``, scoring its own reparameterised draw from the draw's noise.

    For ``z = loc + eps * scale`` from :meth:`rsample`, ``log_prob(z)`` is
    ``-eps**2 / 2 - log(scale) - log(2 pi) / 2``: the same function of ``loc`` and
    ``scale`` as torch's formula, so the same value and the same gradients (the pathwise
    terms through ``z`` cancel exactly), but two kernels on the autograd graph instead of
    six. A guide scores each of its draws so, every step. Any other value (a model site
    replaying the guide's draw, data, a draw changed in place) takes torch's formula,
    with Python-number ``loc``/``scale`` (``Normal(z, 1.0)``) folded into constants.
    """

    _own_draw: tuple | None = None  # (value, eps, value._version) of the last rsample
    _numbers: tuple[float | None, float | None] = (None, None)  # loc, scale given as numbers

    def __init__(self, loc: Any, scale: Any, validate_args: bool | None = None) -> None:
        super().__init__(loc, scale, validate_args=validate_args)
        numbers = (_number(loc), _number(scale))
        if numbers != (None, None):
            self._numbers = numbers

    def expand(self, batch_shape: Any, _instance: Any = None) -> Any:
        return _expand_keeping(self, Normal, batch_shape, _instance, "_numbers")

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().rsample(sample_shape)
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + eps * self.scale
        self._own_draw = (value, eps, value._version)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        draw = self._own_draw
        if draw is not None and value is draw[0] and value._version == draw[2]:
            # Its own unchanged draw needs no support check: a non-finite one comes from
            # non-finite params, which the construction checks (or the checked redo) catch.
            const = draw[1].square().mul_(-0.5).sub_(_LOG_SQRT_2PI)
            return const - self.scale.log()
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self._numbers
        if scale is None or not _covers(value, self._batch_shape):
            return _normal_lp(self, value)
        diff = value if loc == 0 else value - (self.loc if loc is None else loc)
        return diff.square().div(-2 * scale * scale).sub(math.log(scale) + _LOG_SQRT_2PI)


def _normal_lp(d: _td.Normal, value: torch.Tensor) -> torch.Tensor:
    """torch's formula (its sample check done by the caller)."""
    var = d.scale**2
    return -((value - d.loc) ** 2) / (2 * var) - d.scale.log() - _LOG_SQRT_2PI


class _HalfLine:
    """A one-``scale`` distribution on ``[0, inf)`` (placed before torch's class): with a
    Python-number ``scale`` it scores in closed form, ``_closed_form(value, scale)`` where
    ``value >= 0`` and ``-inf`` below."""

    _scale_number: float | None = None

    def __init__(self, scale: Any, validate_args: bool | None = None) -> None:
        super().__init__(scale, validate_args=validate_args)
        self._scale_number = _number(scale)

    def expand(self, batch_shape: Any, _instance: Any = None) -> Any:
        return _expand_keeping(self, _HalfLine, batch_shape, _instance, "_scale_number")

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        s = self._scale_number
        if s is None or not _covers(value, self._batch_shape):
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return torch.where(value >= 0, self._closed_form(value, s), -math.inf)


class HalfNormal(_HalfLine, _td.HalfNormal, DistributionMixin):
    """torch's ``HalfNormal``; with a Python-number ``scale`` it scores in closed form."""

    @staticmethod
    def _closed_form(value: torch.Tensor, s: float) -> torch.Tensor:
        return value.square().div(-2 * s * s).add(math.log(2) - math.log(s) - _LOG_SQRT_2PI)


class HalfCauchy(_HalfLine, _td.HalfCauchy, DistributionMixin):
    """torch's ``HalfCauchy``; with a Python-number ``scale`` it scores in closed form."""

    @staticmethod
    def _closed_form(value: torch.Tensor, s: float) -> torch.Tensor:
        return (value / s).square().log1p().neg().add(math.log(2) - math.log(math.pi) - math.log(s))


_namespace.update(Normal=Normal, HalfNormal=HalfNormal, HalfCauchy=HalfCauchy)


class MaskedDistribution(_td.Distribution, DistributionMixin):
    """Wrap ``base_dist`` so that its log-density is zero where ``mask`` is False."""

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, base_dist: _td.Distribution, mask: bool | torch.Tensor) -> None:
        if isinstance(mask, bool):
            mask = torch.tensor(mask)
        elif mask.dtype != torch.bool:
            raise ValueError(f".mask() needs a bool tensor, got dtype {mask.dtype}")
        batch_shape = torch.broadcast_shapes(mask.shape, base_dist.batch_shape)
        if mask.shape != batch_shape:
            mask = mask.expand(batch_shape)
        if base_dist.batch_shape != batch_shape:
            base_dist = base_dist.expand(batch_shape)
        self.base_dist = base_dist
        self._mask = mask
        super().__init__(batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.base_dist.has_rsample

    @property
    def has_enumerate_support(self) -> bool:
        return self.base_dist.has_enumerate_support

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.base_dist.support

    def expand(self, batch_shape: tuple[int, ...] | torch.Size, _instance: Any = None) -> Any:
        batch_shape = torch.Size(batch_shape)
        return MaskedDistribution(
            self.base_dist.expand(batch_shape), self._mask.expand(batch_shape)
        )

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return self.base_dist.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = self.base_dist.log_prob(value)
        return torch.where(self._mask, lp, lp.new_zeros(()))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base_dist.enumerate_support(expand)

    @property
    def mean(self) -> torch.Tensor:
        return self.base_dist.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base_dist.variance


class Delta(_td.Distribution, DistributionMixin):
    """A point mass at ``v``; ``log_density`` is added to its log-probability.

    :param v: the point, of shape ``batch_shape + event_shape``.
    :param log_density: an optional log-density (e.g. a Jacobian) for the point.
    :param event_dim: how many rightmost dims of ``v`` are event dims.
    """

    has_rsample = True
    arg_constraints: ClassVar[dict] = {"v": constraints.dependent, "log_density": constraints.real}
    # Set (to a 0-dim zero) by code that knows ``log_density`` is identically zero (an
    # autoguide's real-support site): scoring the point itself then needs no tensor work.
    _zero_sum: torch.Tensor | None = None

    def __init__(
        self, v: torch.Tensor, log_density: Any = 0.0, event_dim: int = 0, validate_args=None
    ) -> None:
        if event_dim > v.dim():
            raise ValueError(f"Delta: event_dim={event_dim} exceeds v.dim()={v.dim()}")
        batch_dim = v.dim() - event_dim
        batch_shape, event_shape = v.shape[:batch_dim], v.shape[batch_dim:]
        if isinstance(log_density, (int, float)):
            log_density = torch.full(
                batch_shape, float(log_density), dtype=v.dtype, device=v.device
            )
        elif log_density.shape != batch_shape:
            log_density = log_density.expand(batch_shape)
        self.v = v
        self.log_density = log_density
        super().__init__(batch_shape, event_shape, validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape: tuple[int, ...] | torch.Size, _instance: Any = None) -> Any:
        batch_shape = torch.Size(batch_shape)
        v = self.v.expand(batch_shape + self.event_shape)
        new = Delta(v, self.log_density.expand(batch_shape), len(self.event_shape))
        new._zero_sum = self._zero_sum
        return new

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        if not sample_shape:
            return self.v  # the point itself, so that log_prob can skip the comparison
        return self.v.expand(torch.Size(sample_shape) + self.v.shape)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return self.rsample(sample_shape).detach()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if x is self.v:  # scoring its own draw (the usual case): log 1 + log_density
            return self.log_density
        v = self.v.expand(torch.broadcast_shapes(self.v.shape, x.shape))
        lp = (x == v).to(v.dtype).log()
        if self.event_shape:
            lp = lp.sum(tuple(range(-len(self.event_shape), 0)))
        return lp + self.log_density

    @property
    def mean(self) -> torch.Tensor:
        return self.v

    @property
    def variance(self) -> torch.Tensor:
        return torch.zeros_like(self.v)


def _unwrap_masked(d):
    return (d.base_dist, d._mask) if isinstance(d, MaskedDistribution) else (d, None)


def kl_divergence(p: _td.Distribution, q: _td.Distribution) -> torch.Tensor:
    """KL(p || q), as torch computes it, also through ``.mask()`` and mismatched ``.to_event``.

    Raises ``NotImplementedError`` when torch has no closed form for the pair.
    """
    p_base, p_mask = _unwrap_masked(p)
    q_base, q_mask = _unwrap_masked(q)
    if (p_mask is None) != (q_mask is None):
        # No closed form when only one side is masked (as in Pyro): callers fall back to
        # the Monte-Carlo estimate.
        raise NotImplementedError("KL between a masked and an unmasked distribution")
    if p_mask is not None:
        p_mask = p_mask & q_mask
    if (
        isinstance(p_base, _td.Independent)
        and p_base.reinterpreted_batch_ndims == 1
        and isinstance(p_base.base_dist, _td.Normal)
        and isinstance(q_base, _td.MultivariateNormal)
    ):
        # a diagonal Normal is an MVN with a diagonal scale_tril: torch has that pair
        loc, scale = p_base.base_dist.loc, p_base.base_dist.scale
        loc, scale = torch.broadcast_tensors(loc, scale)
        p_mvn = _td.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale), validate_args=False)
        kl = _torch_kl(p_mvn, q_base)
    elif isinstance(p_base, _td.Independent) and isinstance(q_base, _td.Independent):
        n = p_base.reinterpreted_batch_ndims
        if n == q_base.reinterpreted_batch_ndims:
            kl = kl_divergence(p_base.base_dist, q_base.base_dist)
            kl = kl.sum(tuple(range(-n, 0))) if n else kl
        else:
            kl = _torch_kl(p_base, q_base)
    elif isinstance(p_base, _td.Independent) and not q_base.event_shape:
        # q is a batch of scalars that the model broadcast to p's event shape
        n = p_base.reinterpreted_batch_ndims
        q_full = q_base.expand(p_base.base_dist.batch_shape)
        kl = kl_divergence(p_base.base_dist, q_full).sum(tuple(range(-n, 0)))
    else:
        if p_base.batch_shape != q_base.batch_shape:
            shape = torch.broadcast_shapes(p_base.batch_shape, q_base.batch_shape)
            p_base, q_base = p_base.expand(shape), q_base.expand(shape)
        kl = _torch_kl(p_base, q_base)
    if p_mask is not None:
        kl = torch.where(p_mask, kl, kl.new_zeros(()))
    return kl


@register_kl(Delta, _td.Distribution)
def _kl_delta(p: Delta, q: _td.Distribution) -> torch.Tensor:
    return -q.log_prob(p.v)


__all__ += ["broadcast_all"]

# Pyro's own distributions (imported last: that module builds on DistributionMixin)
from . import _distributions_extra
from ._distributions_extra import *

__all__ += _distributions_extra.__all__

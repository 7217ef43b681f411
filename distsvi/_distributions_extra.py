"""Pyro's own distributions that torch lacks, with Pyro's names, signatures and numbers.

Re-exported by :mod:`distsvi.distributions`, where Pyro has them (``dist.GammaPoisson``,
...). Each draws its samples with the same torch calls in the same order as Pyro's, so
equal seeds give equal samples in both.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.distributions as _td
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all, lazy_property, logits_to_probs, probs_to_logits
from torch.nn.functional import softplus

from .distributions import DistributionMixin

__all__ = [
    "AsymmetricLaplace",
    "BetaBinomial",
    "DirichletMultinomial",
    "GammaPoisson",
    "ImproperUniform",
    "MaskedMixture",
    "SoftLaplace",
    "Unit",
    "ZeroInflatedDistribution",
    "ZeroInflatedNegativeBinomial",
    "ZeroInflatedPoisson",
]

_NO_SHAPE = torch.Size()


class _Base(_td.Distribution, DistributionMixin):
    """What every class here shares: sample-shape arithmetic and the validation switch."""

    def _checked(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return value

    def _new(self, batch_shape: Any, _instance: Any) -> tuple[Any, torch.Size]:
        return self._get_checked_instance(type(self), _instance), torch.Size(batch_shape)

    def _finish(self, new: Any, batch_shape: torch.Size, event_shape: torch.Size = _NO_SHAPE):
        _td.Distribution.__init__(new, batch_shape, event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


def _lbeta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.lgamma() + y.lgamma() - (x + y).lgamma()


class GammaPoisson(_Base):
    """A Poisson whose rate is drawn from ``Gamma(concentration, rate)`` (a negative
    binomial with ``total_count = concentration`` and ``probs = 1 / (1 + rate)``).

    :param concentration: the Gamma's shape (alpha).
    :param rate: the Gamma's rate (beta).
    """

    arg_constraints: ClassVar[dict] = {
        "concentration": constraints.positive,
        "rate": constraints.positive,
    }
    support = constraints.nonnegative_integer

    def __init__(self, concentration: Any, rate: Any, validate_args: bool | None = None) -> None:
        self.concentration, self.rate = broadcast_all(concentration, rate)
        super().__init__(self.concentration.shape, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> GammaPoisson:
        new, batch_shape = self._new(batch_shape, _instance)
        new.concentration = self.concentration.expand(batch_shape)
        new.rate = self.rate.expand(batch_shape)
        return self._finish(new, batch_shape)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        poisson_rate = _td.Gamma(self.concentration.expand(shape), self.rate.expand(shape)).sample()
        return _td.Poisson(poisson_rate).sample()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k, a, b = self._checked(value), self.concentration, self.rate
        return (k + a).lgamma() - a.lgamma() - (k + 1).lgamma() + a * b.log() - (k + a) * b.log1p()

    @property
    def mean(self) -> torch.Tensor:
        return self.concentration / self.rate

    @property
    def variance(self) -> torch.Tensor:
        return self.concentration * (1 + self.rate) / self.rate**2


class BetaBinomial(_Base):
    """A Binomial of ``total_count`` trials whose success probability is drawn from
    ``Beta(concentration1, concentration0)``.

    :param concentration1: the Beta's alpha.
    :param concentration0: the Beta's beta.
    :param total_count: the number of trials.
    """

    arg_constraints: ClassVar[dict] = {
        "concentration1": constraints.positive,
        "concentration0": constraints.positive,
        "total_count": constraints.nonnegative_integer,
    }
    has_enumerate_support = True

    def __init__(
        self,
        concentration1: Any,
        concentration0: Any,
        total_count: Any = 1,
        validate_args: bool | None = None,
    ) -> None:
        self.concentration1, self.concentration0, self.total_count = broadcast_all(
            concentration1, concentration0, total_count
        )
        super().__init__(self.concentration1.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.integer_interval(0, self.total_count)

    def expand(self, batch_shape: Any, _instance: Any = None) -> BetaBinomial:
        new, batch_shape = self._new(batch_shape, _instance)
        new.concentration1 = self.concentration1.expand(batch_shape)
        new.concentration0 = self.concentration0.expand(batch_shape)
        new.total_count = self.total_count.expand(batch_shape)
        return self._finish(new, batch_shape)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        probs = _td.Beta(self.concentration1, self.concentration0).sample(sample_shape)
        return _td.Binomial(self.total_count, probs, validate_args=False).sample()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k, n = self._checked(value), self.total_count
        a, b = self.concentration1, self.concentration0
        log_choose = (n + 1).lgamma() - (k + 1).lgamma() - (n - k + 1).lgamma()
        return log_choose + _lbeta(k + a, n - k + b) - _lbeta(a, b)

    @property
    def mean(self) -> torch.Tensor:
        a, b = self.concentration1, self.concentration0
        return self.total_count * a / (a + b)

    @property
    def variance(self) -> torch.Tensor:
        a, b, n = self.concentration1, self.concentration0, self.total_count
        return n * a * b * (a + b + n) / ((a + b) ** 2 * (a + b + 1))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        n = int(self.total_count.max())
        if self.total_count.min() != n:
            raise NotImplementedError(
                "BetaBinomial.enumerate_support needs one total_count for the whole batch"
            )
        values = torch.arange(
            n + 1, dtype=self.concentration1.dtype, device=self.total_count.device
        )
        values = values.view((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1,) + self.batch_shape) if expand else values


class DirichletMultinomial(_Base):
    """A Multinomial of ``total_count`` trials whose class probabilities are drawn from
    ``Dirichlet(concentration)``.

    :param concentration: the Dirichlet's concentration (its last dim is the event).
    :param total_count: the number of trials.
    :param is_sparse: Pyro's hint that values are mostly zero (the result is the same).
    """

    arg_constraints: ClassVar[dict] = {
        "concentration": constraints.independent(constraints.positive, 1),
        "total_count": constraints.nonnegative_integer,
    }

    def __init__(
        self,
        concentration: torch.Tensor,
        total_count: Any = 1,
        is_sparse: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        batch_shape, event_shape = concentration.shape[:-1], concentration.shape[-1:]
        if torch.is_tensor(total_count):
            batch_shape = torch.broadcast_shapes(batch_shape, total_count.shape)
            concentration = concentration.expand(batch_shape + event_shape)
            total_count = total_count.expand(batch_shape)
        else:
            total_count = concentration.new_tensor(total_count)
        self.concentration, self.total_count, self.is_sparse = concentration, total_count, is_sparse
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.multinomial(self.total_count)

    def expand(self, batch_shape: Any, _instance: Any = None) -> DirichletMultinomial:
        new, batch_shape = self._new(batch_shape, _instance)
        new.concentration = self.concentration.expand(batch_shape + self.event_shape)
        new.total_count = self.total_count.expand(batch_shape)
        new.is_sparse = self.is_sparse
        return self._finish(new, batch_shape, self.event_shape)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        probs = _td.Dirichlet(self.concentration).sample(sample_shape)
        n = int(self.total_count.max())
        if self.total_count.min() != n:
            raise NotImplementedError(
                "DirichletMultinomial.sample needs one total_count for the whole batch"
            )
        return _td.Multinomial(n, probs).sample()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        x, alpha = self._checked(value), self.concentration
        n, alpha_sum = x.sum(-1), alpha.sum(-1)
        per_class = (x + alpha).lgamma() - alpha.lgamma() - (x + 1).lgamma()
        return (n + 1).lgamma() + alpha_sum.lgamma() - (n + alpha_sum).lgamma() + per_class.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        alpha = self.concentration
        return self.total_count.unsqueeze(-1) * alpha / alpha.sum(-1, keepdim=True)

    @property
    def variance(self) -> torch.Tensor:
        n, alpha = self.total_count.unsqueeze(-1), self.concentration
        alpha_sum = alpha.sum(-1, keepdim=True)
        p = alpha / alpha_sum
        return n * p * (1 - p) * (n + alpha_sum) / (1 + alpha_sum)


class ZeroInflatedDistribution(_Base):
    """``base_dist`` with extra zeros: a zero with probability ``gate``, else a draw.

    :param base_dist: a distribution with an empty event shape.
    :param gate: the probability of an extra zero (give this or ``gate_logits``).
    :param gate_logits: its log-odds.
    """

    arg_constraints: ClassVar[dict] = {
        "gate": constraints.unit_interval,
        "gate_logits": constraints.real,
    }

    def __init__(
        self,
        base_dist: _td.Distribution,
        *,
        gate: torch.Tensor | None = None,
        gate_logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if (gate is None) == (gate_logits is None):
            raise ValueError(f"{type(self).__name__}: give either gate or gate_logits, not both")
        if base_dist.event_shape:
            raise ValueError(
                f"{type(self).__name__} needs a base distribution with an empty event shape, "
                f"got event shape {tuple(base_dist.event_shape)}"
            )
        given = gate if gate is not None else gate_logits
        batch_shape = torch.broadcast_shapes(given.shape, base_dist.batch_shape)
        self._by_logits = gate is None  # log_prob stays in the space the user gave
        if gate is not None:
            self.gate = gate.expand(batch_shape)
        else:
            self.gate_logits = gate_logits.expand(batch_shape)
        self.base_dist = base_dist.expand(batch_shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self.base_dist.support

    @lazy_property
    def gate(self) -> torch.Tensor:
        return logits_to_probs(self.gate_logits, is_binary=True)

    @lazy_property
    def gate_logits(self) -> torch.Tensor:
        return probs_to_logits(self.gate, is_binary=True)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = self._checked(value)
        if not self._by_logits:
            gate, value = broadcast_all(self.gate, value)
            nonzero = (-gate).log1p() + self.base_dist.log_prob(value)
            zero = (gate + nonzero.exp()).log()
        else:  # in log space, stable for extreme gates
            logits, value = broadcast_all(self.gate_logits, value)
            log_gate = -softplus(-logits)
            base_minus_logit = self.base_dist.log_prob(value) - logits
            nonzero = base_minus_logit + log_gate
            zero = softplus(base_minus_logit) + log_gate
        return torch.where(value == 0, zero, nonzero)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            extra_zero = torch.bernoulli(self.gate.expand(shape)).bool()
            draws = self.base_dist.expand(shape).sample()
            return torch.where(extra_zero, draws.new_zeros(()), draws)

    @property
    def mean(self) -> torch.Tensor:
        return (1 - self.gate) * self.base_dist.mean

    @property
    def variance(self) -> torch.Tensor:
        base = self.base_dist
        return (1 - self.gate) * (base.mean**2 + base.variance) - self.mean**2

    def expand(self, batch_shape: Any, _instance: Any = None) -> ZeroInflatedDistribution:
        new, batch_shape = self._new(batch_shape, _instance)
        key = "gate_logits" if self._by_logits else "gate"
        gates = {key: getattr(self, key).expand(batch_shape)}
        ZeroInflatedDistribution.__init__(
            new, self.base_dist.expand(batch_shape), **gates, validate_args=False
        )
        new._validate_args = self._validate_args
        return new


class ZeroInflatedPoisson(ZeroInflatedDistribution):
    """A Poisson of ``rate`` with extra zeros (``gate`` or ``gate_logits``)."""

    arg_constraints: ClassVar[dict] = {
        "rate": constraints.positive,
        "gate": constraints.unit_interval,
        "gate_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        rate: Any,
        *,
        gate: torch.Tensor | None = None,
        gate_logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        base = _td.Poisson(rate, validate_args=False)
        base._validate_args = validate_args
        super().__init__(base, gate=gate, gate_logits=gate_logits, validate_args=validate_args)

    @property
    def rate(self) -> torch.Tensor:
        return self.base_dist.rate


class ZeroInflatedNegativeBinomial(ZeroInflatedDistribution):
    """A NegativeBinomial (``total_count`` and ``probs`` or ``logits``) with extra zeros."""

    arg_constraints: ClassVar[dict] = {
        "total_count": constraints.greater_than_eq(0),
        "probs": constraints.half_open_interval(0.0, 1.0),
        "logits": constraints.real,
        "gate": constraints.unit_interval,
        "gate_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        total_count: Any,
        *,
        probs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        gate_logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        base = _td.NegativeBinomial(total_count, probs=probs, logits=logits, validate_args=False)
        base._validate_args = validate_args
        super().__init__(base, gate=gate, gate_logits=gate_logits, validate_args=validate_args)

    @property
    def total_count(self) -> torch.Tensor:
        return self.base_dist.total_count

    @property
    def probs(self) -> torch.Tensor:
        return self.base_dist.probs

    @property
    def logits(self) -> torch.Tensor:
        return self.base_dist.logits


class _MaskedConstraint(constraints.Constraint):
    """``constraint1`` where ``mask`` is True, ``constraint0`` elsewhere."""

    def __init__(self, mask: torch.Tensor, constraint0: Any, constraint1: Any) -> None:
        self.mask, self.constraint0, self.constraint1 = mask, constraint0, constraint1
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        ok0, ok1 = self.constraint0.check(value), self.constraint1.check(value)
        return torch.where(self.mask.expand(ok0.shape), ok1, ok0)


class MaskedMixture(_Base):
    """``component1`` where ``mask`` is True and ``component0`` where it is False, element
    by element of the batch (a deterministic mixture, e.g. around a change point).

    :param mask: a bool tensor that broadcasts to the batch shape.
    :param component0: the distribution where ``mask`` is False.
    :param component1: the distribution where ``mask`` is True.
    """

    arg_constraints: ClassVar[dict] = {}

    def __init__(
        self,
        mask: torch.Tensor,
        component0: _td.Distribution,
        component1: _td.Distribution,
        validate_args: bool | None = None,
    ) -> None:
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise ValueError(f"MaskedMixture needs a bool tensor as mask, got {type(mask)}")
        if component0.event_shape != component1.event_shape:
            raise ValueError(
                "MaskedMixture components have different event shapes: "
                f"{tuple(component0.event_shape)} and {tuple(component1.event_shape)}"
            )
        batch_shape = torch.broadcast_shapes(
            mask.shape, component0.batch_shape, component1.batch_shape
        )
        self.mask = mask.expand(batch_shape)
        self.component0 = component0.expand(batch_shape)
        self.component1 = component1.expand(batch_shape)
        super().__init__(batch_shape, component0.event_shape, validate_args=validate_args)
        # A value is valid for the component that drew it only: validate with the mixed support.
        self.component0._validate_args = False
        self.component1._validate_args = False

    @property
    def has_rsample(self) -> bool:
        return self.component0.has_rsample and self.component1.has_rsample

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        s0, s1 = self.component0.support, self.component1.support
        return s0 if s0 is s1 else _MaskedConstraint(self.mask, s0, s1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> MaskedMixture:
        batch_shape = torch.Size(batch_shape)
        return MaskedMixture(
            self.mask.expand(batch_shape),
            self.component0.expand(batch_shape),
            self.component1.expand(batch_shape),
            validate_args=self._validate_args,
        )

    def _pick(self, sample_shape: torch.Size, draw1: torch.Tensor, draw0: torch.Tensor):
        mask = self.mask.reshape(self.mask.shape + (1,) * len(self.event_shape))
        return torch.where(mask.expand(self._extended_shape(sample_shape)), draw1, draw0)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        draw1 = self.component1.sample(sample_shape)  # component1 first, as Pyro draws
        return self._pick(sample_shape, draw1, self.component0.sample(sample_shape))

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        draw1 = self.component1.rsample(sample_shape)
        return self._pick(sample_shape, draw1, self.component0.rsample(sample_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        value = self._checked(value.expand(shape))
        mask = self.mask.expand(shape[: len(shape) - len(self.event_shape)])
        return torch.where(mask, self.component1.log_prob(value), self.component0.log_prob(value))

    @property
    def mean(self) -> torch.Tensor:
        return self._pick(_NO_SHAPE, self.component1.mean, self.component0.mean)

    @property
    def variance(self) -> torch.Tensor:
        return self._pick(_NO_SHAPE, self.component1.variance, self.component0.variance)


class Unit(_Base):
    """The unit type: one value with no data (event shape ``(0,)``), scored
    ``log_factor``; what a ``factor`` statement records.

    :param log_factor: the log-density, of the batch shape.
    :param has_rsample: whether the factor counts as reparameterised (Pyro's switch).
    """

    arg_constraints: ClassVar[dict] = {"log_factor": constraints.real}
    support = constraints.real

    def __init__(
        self, log_factor: Any, *, has_rsample: bool | None = None, validate_args: bool | None = None
    ) -> None:
        self.log_factor = torch.as_tensor(log_factor)
        if has_rsample is not None:
            self.has_rsample = has_rsample
        super().__init__(self.log_factor.shape, torch.Size((0,)), validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> Unit:
        new, batch_shape = self._new(batch_shape, _instance)
        new.log_factor = self.log_factor.expand(batch_shape)
        if "has_rsample" in self.__dict__:
            new.has_rsample = self.has_rsample
        return self._finish(new, batch_shape, self.event_shape)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        return self.log_factor.new_empty(self._extended_shape(sample_shape))

    rsample = sample

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.log_factor.expand(torch.broadcast_shapes(self.batch_shape, value.shape[:-1]))


class ImproperUniform(_Base):
    """A flat, improper density (log-probability 0) on ``support``, which cannot be
    sampled: a latent whose value the guide always provides.

    :param support: a ``constraints.Constraint``.
    :param batch_shape: the batch shape.
    :param event_shape: the event shape.
    """

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, support: constraints.Constraint, batch_shape: Any, event_shape: Any) -> None:
        if not isinstance(support, constraints.Constraint):
            raise TypeError(f"ImproperUniform needs a Constraint as support, got {support!r}")
        self._support = support
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape))

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Any, _instance: Any = None) -> ImproperUniform:
        new, batch_shape = self._new(batch_shape, _instance)
        new._support = self._support
        return self._finish(new, batch_shape, self.event_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch = torch.broadcast_shapes(
            value.shape[: value.dim() - len(self.event_shape)], self.batch_shape
        )
        return torch.zeros(()).expand(batch)

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        raise NotImplementedError(
            "ImproperUniform cannot be sampled: let the guide provide this site's value, or use "
            "a proper distribution with .mask(False) for a flat density that can be drawn"
        )


class AsymmetricLaplace(_Base):
    """A Laplace with different scales left and right of ``loc``.

    :param loc: the mode.
    :param scale: the geometric mean of the left and right scales.
    :param asymmetry: the square of the ratio of the left scale to the right one.
    """

    arg_constraints: ClassVar[dict] = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "asymmetry": constraints.positive,
    }
    support = constraints.real
    has_rsample = True

    def __init__(
        self, loc: Any, scale: Any, asymmetry: Any, *, validate_args: bool | None = None
    ) -> None:
        self.loc, self.scale, self.asymmetry = broadcast_all(loc, scale, asymmetry)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @lazy_property
    def left_scale(self) -> torch.Tensor:
        return self.scale * self.asymmetry

    @lazy_property
    def right_scale(self) -> torch.Tensor:
        return self.scale / self.asymmetry

    def expand(self, batch_shape: Any, _instance: Any = None) -> AsymmetricLaplace:
        new, batch_shape = self._new(batch_shape, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.asymmetry = self.asymmetry.expand(batch_shape)
        return self._finish(new, batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = self._checked(value) - self.loc
        side_scale = torch.where(z < 0, self.left_scale, self.right_scale)
        return -z.abs() / side_scale - (self.left_scale + self.right_scale).log()

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        # a right Exponential minus a left one: the two are drawn in one call, as Pyro does
        left, right = self.loc.new_empty((2,) + self._extended_shape(sample_shape)).exponential_()
        return self.loc - self.left_scale * left + self.right_scale * right

    @property
    def mean(self) -> torch.Tensor:
        left, right = self.left_scale, self.right_scale
        return self.loc + (right - left)

    @property
    def variance(self) -> torch.Tensor:
        left, right = self.left_scale, self.right_scale
        total = left + right
        p, q = left / total, right / total
        return p * left**2 + q * right**2 + p * q * total**2


class SoftLaplace(_Base):
    """A smooth, log-convex density with Laplace-like tails:
    ``log p(x) = log(2/pi) - log(scale) - logaddexp(z, -z)``, ``z = (x - loc) / scale``.

    :param loc: the location.
    :param scale: the scale.
    """

    arg_constraints: ClassVar[dict] = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: Any, scale: Any, *, validate_args: bool | None = None) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> SoftLaplace:
        new, batch_shape = self._new(batch_shape, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        return self._finish(new, batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = (self._checked(value) - self.loc) / self.scale
        return math.log(2 / math.pi) - self.scale.log() - torch.logaddexp(z, -z)

    def rsample(self, sample_shape: torch.Size = _NO_SHAPE) -> torch.Tensor:
        u = self.loc.new_empty(self._extended_shape(sample_shape)).uniform_()
        return self.icdf(u)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        z = (self._checked(value) - self.loc) / self.scale
        return z.exp().atan() * (2 / math.pi)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        return (value * (math.pi / 2)).tan().log() * self.scale + self.loc

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return (math.pi / 2 * self.scale) ** 2

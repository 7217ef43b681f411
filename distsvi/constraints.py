"""torch's constraints plus the ones Pyro adds for guide params.

Everything of :mod:`torch.distributions.constraints` is available here under the same
name. Added, with Pyro's names and maps from unconstrained space:

- ``softplus_positive``: positive reals reached by ``softplus`` instead of ``exp`` (what
  Pyro 1.9's autoguides use for their scales; gentler for large values);
- ``softplus_lower_cholesky``: lower-triangular matrices whose diagonal is ``softplus``
  of the unconstrained one;
- ``unit_lower_cholesky``: lower-triangular matrices with ones on the diagonal (the
  unconstrained value's strict lower triangle).

Their transforms are registered with torch's ``transform_to`` (and ``biject_to`` for the
bijective ones), so ``param(name, init, constraints.softplus_positive)`` and the param
store work with them as with torch's own; the store saves them by these names.
"""

from __future__ import annotations

import torch
import torch.distributions.constraints as _torch_constraints
from torch.distributions import biject_to, transform_to
from torch.distributions.constraints import *  # noqa: F403  (torch's constraints, same names)
from torch.distributions.constraints import Constraint, __all__ as _torch_all
from torch.distributions.transforms import SoftplusTransform, Transform


class _SoftplusPositive(type(_torch_constraints.positive)):
    def __init__(self) -> None:
        super().__init__(lower_bound=0.0)

    def __repr__(self) -> str:
        return "SoftplusPositive()"


class _SoftplusLowerCholesky(type(_torch_constraints.lower_cholesky)):
    pass


class _UnitLowerCholesky(Constraint):
    """Lower-triangular square matrices with ones on the diagonal."""

    event_dim = 2

    def check(self, value: torch.Tensor) -> torch.Tensor:
        lower = (value.tril() == value).flatten(-2).all(-1)
        ones = (value.diagonal(dim1=-2, dim2=-1) == 1).all(-1)
        return lower & ones


softplus_positive = _SoftplusPositive()
softplus_lower_cholesky = _SoftplusLowerCholesky()
unit_lower_cholesky = _UnitLowerCholesky()

# The names the param store may save a constraint under (besides torch's own).
EXTRA = {
    "softplus_positive": softplus_positive,
    "softplus_lower_cholesky": softplus_lower_cholesky,
    "unit_lower_cholesky": unit_lower_cholesky,
}


def _eye_like(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(x.size(-1), dtype=x.dtype, device=x.device)


class SoftplusLowerCholeskyTransform(Transform):
    """Unconstrained square matrices -> lower-triangular with a softplus diagonal."""

    domain = _torch_constraints.independent(_torch_constraints.real, 2)
    codomain = _torch_constraints.lower_cholesky

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SoftplusLowerCholeskyTransform)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        diag = torch.nn.functional.softplus(x.diagonal(dim1=-2, dim2=-1))
        return x.tril(-1) + diag.diag_embed()

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        d = y.diagonal(dim1=-2, dim2=-1)
        return y.tril(-1) + ((-d).expm1().neg().log() + d).diag_embed()


class UnitLowerCholeskyTransform(Transform):
    """Unconstrained square matrices -> their strict lower triangle plus the identity.

    The inverse is the identity map, so a stored value keeps its (unused) upper triangle
    and diagonal as initialised; they get no gradient.
    """

    domain = _torch_constraints.independent(_torch_constraints.real, 2)
    codomain = unit_lower_cholesky

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitLowerCholeskyTransform)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x.tril(-1) + _eye_like(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y


@biject_to.register(_SoftplusPositive)
@transform_to.register(_SoftplusPositive)
def _softplus_positive(constraint: Constraint) -> Transform:
    return SoftplusTransform()


@transform_to.register(_SoftplusLowerCholesky)
def _softplus_lower_cholesky(constraint: Constraint) -> Transform:
    return SoftplusLowerCholeskyTransform()


@transform_to.register(_UnitLowerCholesky)
def _unit_lower_cholesky(constraint: Constraint) -> Transform:
    return UnitLowerCholeskyTransform()


def __getattr__(name: str):
    # torch's private constraint classes (``_GreaterThan``...) that user code may name
    return getattr(_torch_constraints, name)


__all__ = [*_torch_all, *EXTRA]

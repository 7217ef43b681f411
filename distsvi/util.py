"""The helpers of ``pyro.util`` that models, scripts and examples import.

``set_rng_seed``, ``get_rng_state``/``set_rng_state``, NaN/inf checks that also watch the
gradient, ``check_site_shape`` (a site's log-prob shape against its plates), context-manager
helpers (``optional``, ``timed``, ``ignore_jit_warnings``, ``ignore_experimental_warning``).
"""

from __future__ import annotations

import math
import numbers
import sys
import timeit
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from itertools import zip_longest
from typing import Any, Self

import torch

from .poutine.handlers import get_rng_state, set_rng_seed, set_rng_state

__all__ = [
    "ExperimentalWarning",
    "check_site_shape",
    "get_rng_state",
    "ignore_experimental_warning",
    "ignore_jit_warnings",
    "jit_iter",
    "optional",
    "set_rng_seed",
    "set_rng_state",
    "timed",
    "torch_float",
    "torch_isinf",
    "torch_isnan",
    "warn_if_inf",
    "warn_if_nan",
]


def torch_isnan(x: torch.Tensor | numbers.Number) -> bool | torch.Tensor:
    """Whether ``x`` (a tensor: any element of it) is NaN."""
    if isinstance(x, numbers.Number):
        return x != x  # noqa: PLR0124  (NaN is the one number unequal to itself)
    return torch.isnan(x).any()


def torch_isinf(x: torch.Tensor | numbers.Number) -> bool | torch.Tensor:
    """Whether ``x`` (a tensor: any element of it) is +inf or -inf."""
    if isinstance(x, numbers.Number):
        return x in (math.inf, -math.inf)
    return torch.isinf(x).any()


def _caller(filename: str | None, lineno: int | None) -> tuple[str, int]:
    """Where the warning points: the given place, else the caller of the public function."""
    if filename is not None:
        return filename, lineno or 1
    frame = sys._getframe(2)
    return frame.f_code.co_filename, frame.f_lineno


def _warn(what: str, msg: str, where: tuple[str, int]) -> None:
    warnings.warn_explicit(f"Encountered {what}{': ' + msg if msg else '.'}", UserWarning, *where)


def warn_if_nan(
    value: Any, msg: str = "", *, filename: str | None = None, lineno: int | None = None
) -> Any:
    """Warn if ``value`` holds a NaN, and again in backward if its gradient does; returns
    ``value``.

    :param value: a tensor or a number.
    :param msg: what to add to the warning.
    """
    where = _caller(filename, lineno)
    if torch.is_tensor(value) and value.requires_grad:
        value.register_hook(
            lambda g: warn_if_nan(g, "backward " + msg, filename=where[0], lineno=where[1])
        )
    if torch_isnan(value):
        _warn("NaN", msg, where)
    return value


def warn_if_inf(
    value: Any,
    msg: str = "",
    allow_posinf: bool = False,
    allow_neginf: bool = False,
    *,
    filename: str | None = None,
    lineno: int | None = None,
) -> Any:
    """Warn if ``value`` holds +inf or -inf (unless allowed), and again in backward if its
    gradient does; returns ``value``."""
    where = _caller(filename, lineno)
    if torch.is_tensor(value) and value.requires_grad:
        value.register_hook(
            lambda g: warn_if_inf(
                g, "backward " + msg, allow_posinf, allow_neginf, filename=where[0], lineno=where[1]
            )
        )
    for sign, allowed in ((math.inf, allow_posinf), (-math.inf, allow_neginf)):
        if not allowed and bool(
            value == sign if isinstance(value, numbers.Number) else (value == sign).any()
        ):
            _warn("+inf" if sign > 0 else "-inf", msg, where)
    return value


def check_site_shape(site: dict, max_plate_nesting: int) -> None:
    """Raise ``ValueError`` if ``site["log_prob"]``'s shape does not fit its plates.

    Each plate with a ``dim`` fixes the size at that dim; dims left of ``max_plate_nesting``
    are not checked. Call it on a trace's sample sites after ``compute_log_prob()``.
    """
    name = site["name"]
    expected: list[int | None] = []
    for frame in site["cond_indep_stack"]:
        if frame.dim is None:
            continue
        if len(expected) < -frame.dim:
            expected = [None] * (-frame.dim - len(expected)) + expected
        if expected[frame.dim] is not None:
            raise ValueError(
                f"at site {name!r} within plate({frame.name!r}, dim={frame.dim}), dim "
                "collision: give the other plates another dim"
            )
        expected[frame.dim] = frame.size
    if len(expected) > max_plate_nesting:
        raise ValueError(
            f"at site {name!r}, plate stack overflow: set max_plate_nesting to at least "
            f"{len(expected)}"
        )
    actual = list(site["log_prob"].shape)[-max_plate_nesting:] if max_plate_nesting else []
    for got, want in zip_longest(reversed(actual), reversed(expected), fillvalue=1):
        if want is not None and want != got:
            shown = [-1 if e is None else e for e in expected]
            raise ValueError(
                f"at site {name!r}, invalid log_prob shape: expected {shown}, actual {actual}. "
                "Enclose the batched tensor in a `with pyro.plate(...):`, `.to_event(...)` the "
                "distribution, or permute the data's dims"
            )


@contextmanager
def ignore_jit_warnings(filter: list | None = None) -> Iterator[None]:
    """Silence ``torch.jit.TracerWarning`` (those matching ``filter``, a list of messages or
    ``(message, category)`` pairs) while tracing; outside tracing it does nothing."""
    if not torch._C._get_tracing_state():
        yield
        return
    with warnings.catch_warnings():
        if filter is None:
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for entry in filter or ():
            message, category = (
                entry if isinstance(entry, tuple) else (entry, torch.jit.TracerWarning)
            )
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def jit_iter(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``list(tensor)``, without the warnings iterating a tensor gives under the tracer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Iterating over a tensor")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return list(tensor)


class optional:  # lower case: Pyro's name
    """Enter ``context_manager`` only if ``condition`` holds."""

    def __init__(self, context_manager: AbstractContextManager, condition: bool) -> None:
        self.context_manager = context_manager
        self.condition = condition

    def __enter__(self) -> Any:
        return self.context_manager.__enter__() if self.condition else None

    def __exit__(self, *exc_info: object) -> Any:
        return self.context_manager.__exit__(*exc_info) if self.condition else None


class ExperimentalWarning(UserWarning):
    """Warns of a feature whose interface may change."""


@contextmanager
def ignore_experimental_warning() -> Iterator[None]:
    """Silence :class:`ExperimentalWarning` inside."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


class timed:  # lower case: Pyro's name
    """``with timed() as t: ...`` leaves the block's wall time in ``t.elapsed`` (seconds)."""

    def __enter__(self) -> Self:
        self.start = timeit.default_timer()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end = timeit.default_timer()
        self.elapsed = self.end - self.start


def torch_float(x: torch.Tensor | float) -> torch.Tensor | float:
    """``x.float()`` for a tensor, ``float(x)`` for a number."""
    return x.float() if torch.is_tensor(x) else float(x)

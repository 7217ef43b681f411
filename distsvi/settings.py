"""Global settings, read and written by name, as ``pyro.settings``::

    distsvi.settings.get()                          # {name: value} of every setting
    distsvi.settings.get("module_local_params")     # one setting
    distsvi.settings.set(module_local_params=True)
    with distsvi.settings.context(module_local_params=True):   # also a decorator
        ...

A setting is an attribute of some module (``register`` names it by module and dotted
attribute path), so the code that uses it reads a plain attribute. This module imports
nothing of distsvi: a setting's module is imported when the setting is first read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

__all__ = ["context", "get", "register", "set"]

# alias -> (module name, dotted attribute path, validator or None)
_REGISTRY: dict[str, tuple[str, str, Callable[[Any], None] | None]] = {}


def _entry(alias: str) -> tuple[str, str, Callable[[Any], None] | None]:
    try:
        return _REGISTRY[alias]
    except KeyError:
        raise KeyError(f"unknown setting {alias!r}; the settings are {sorted(_REGISTRY)}") from None


def get(alias: str | None = None) -> Any:
    """One setting's value, or ``{name: value}`` of all of them when ``alias`` is None.

    :param alias: a registered setting's name.
    :returns: its current value.
    """
    if alias is None:
        return {name: get(name) for name in sorted(_REGISTRY)}
    module, path, _ = _entry(alias)
    value: Any = import_module(module)
    for attr in path.split("."):
        value = getattr(value, attr)
    return value


def set(**kwargs: Any) -> None:
    """Set one or more settings: ``set(module_local_params=True)``.

    Each value is checked by the setting's validator before anything is changed.
    """
    for alias, value in kwargs.items():
        validator = _entry(alias)[2]
        if validator is not None:
            validator(value)
    for alias, value in kwargs.items():
        module, path, _ = _REGISTRY[alias]
        owner: Any = import_module(module)
        *outer, last = path.split(".")
        for attr in outer:
            owner = getattr(owner, attr)
        setattr(owner, last, value)


@contextmanager
def context(**kwargs: Any) -> Iterator[None]:
    """Change settings inside a ``with`` block (or a decorated function), then restore them."""
    old = {alias: get(alias) for alias in kwargs}
    set(**kwargs)
    try:
        yield
    finally:
        set(**old)


def register(
    alias: str, modulename: str, deepname: str, validator: Callable[[Any], None] | None = None
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Make the attribute ``modulename.deepname`` a setting called ``alias``.

    :param alias: the setting's name.
    :param modulename: the module holding it, e.g. ``"distsvi.nn"``.
    :param deepname: the attribute path in that module, e.g. ``"Binomial.thresh"``.
    :param validator: optional ``fn(value)`` raising on a bad value.
    :returns: a decorator that registers the function it decorates as the validator.
    """
    _REGISTRY[alias] = (modulename, deepname, validator)

    def decorator(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        _REGISTRY[alias] = (modulename, deepname, fn)
        return fn

    return decorator


def _check_bool(alias: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"setting {alias!r} takes True or False, got {value!r}")

    return check


register(
    "module_local_params", "distsvi.nn", "_MODULE_LOCAL_PARAMS", _check_bool("module_local_params")
)
register(
    "validate_distributions_torch",
    "torch.distributions.distribution",
    "Distribution._validate_args",
    _check_bool("validate_distributions_torch"),
)

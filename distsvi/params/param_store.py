"""The param store: named tensors kept unconstrained, handed out constrained.

Optimizers see the unconstrained leaf tensors (so a ``positive`` param can never step
out of its support); :func:`distsvi.param` returns ``transform_to(constraint)(x)``, the
same map Pyro uses, so gradients agree with Pyro's.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, KeysView
from typing import Any

import torch
from torch.distributions import transform_to

from .. import constraints
from . import rows as _rows


def _spec(c: constraints.Constraint) -> str:
    """A constraint as a string that survives ``torch.load(weights_only=True)``."""
    for name, extra in constraints.EXTRA.items():  # before greater_than: softplus_positive is one
        if c is extra:
            return name
    if isinstance(c, constraints.independent):
        return f"independent({_spec(c.base_constraint)},{c.reinterpreted_batch_ndims})"
    for attr in ("lower_bound", "upper_bound"):
        if hasattr(c, attr) and not isinstance(getattr(c, attr), (int, float)):
            break
    else:
        if isinstance(c, (constraints.interval, constraints.half_open_interval)):
            return f"{type(c).__name__.lstrip('_')}({c.lower_bound!r},{c.upper_bound!r})"
        if isinstance(c, (constraints.greater_than, constraints.greater_than_eq)):
            return f"{type(c).__name__.lstrip('_')}({c.lower_bound!r})"
        if isinstance(c, constraints.less_than):
            return f"{type(c).__name__.lstrip('_')}({c.upper_bound!r})"
    for name in dir(constraints):
        if getattr(constraints, name) is c:
            return name
    raise ValueError(
        f"constraint {c!r} cannot be saved by name; use one of torch.distributions.constraints"
    )


_SPEC = re.compile(r"^(\w+)\((.*)\)$")


def _from_spec(spec: str) -> constraints.Constraint:
    m = _SPEC.match(spec)
    if m is None:
        return getattr(constraints, spec)
    name, args = m.groups()
    if name == "independent":
        base, n = args.rsplit(",", 1)
        return constraints.independent(_from_spec(base), int(n))
    cls = getattr(constraints, name, None) or getattr(constraints, "_" + name[0].upper() + name[1:])
    return cls(*(float(a) for a in args.split(",")))


def _check_init(name: str, value: torch.Tensor, constraint: constraints.Constraint) -> None:
    if constraint is constraints.real:
        return
    with torch.no_grad():
        ok = constraint.check(value)
    if not bool(ok.all()):
        raise ValueError(
            f"param {name!r}: initial value is outside its constraint {constraint}; "
            f"give an init inside the support (e.g. a positive value for constraints.positive)"
        )


class _Unconstrained:
    """``param(...).unconstrained()``: a weak handle on the leaf; it pickles as a dead one,
    so a param value can still cross a process boundary."""

    __slots__ = ("_ref",)

    def __init__(self, x: torch.Tensor | None = None) -> None:
        self._ref = None if x is None else weakref.ref(x)

    def __call__(self) -> torch.Tensor | None:
        return None if self._ref is None else self._ref()

    def __reduce__(self):
        return (_Unconstrained, ())


class ParamStore:
    """A dict of named params: ``name -> unconstrained leaf tensor`` plus its constraint.

    ``version`` counts the changes to which tensors the store holds: it goes up whenever a
    param is created, replaced, deleted or loaded, or the store is cleared, and never when
    an optimizer updates a param in place. Code that caches the store's tensors (the
    compiled SVI step) compares it to the version it saw to know when to look again.
    """

    def __init__(self) -> None:
        self.version = 0
        self._params: dict[str, torch.Tensor] = {}
        self._constraints: dict[str, constraints.Constraint] = {}
        self._transforms: dict[str, Any] = {}
        # Modules registered by distsvi.module, by name: their buffers (e.g. BatchNorm
        # statistics) are state that is not a param, which data parallelism keeps in sync.
        self._modules: dict[str, torch.nn.Module] = {}

    # dict-like access -------------------------------------------------------------
    def clear(self) -> None:
        self.version += 1
        _rows.forget()
        self._params.clear()
        self._constraints.clear()
        self._transforms.clear()
        self._modules.clear()

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, name: str) -> bool:
        return name in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def keys(self) -> KeysView[str]:
        return self._params.keys()

    def values(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in self._params)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, constrained value)`` pairs."""
        return ((k, self[k]) for k in list(self._params))

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, unconstrained leaf tensor)`` pairs: what optimizers update."""
        return iter(list(self._params.items()))

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._transforms[name]
        x = self._params[name]
        value = x if t is None else t(x)
        if not torch.compiler.is_compiling():
            # Pyro's handle on the leaf, ``param(...).unconstrained()`` (get_state strips it
            # again, so that a state holds plain tensors); an unconstrained param is its own
            # leaf and keeps the handle it was given
            held = value.__dict__.get("unconstrained") if t is None else None
            if held is None or held() is not x:
                value.unconstrained = _Unconstrained(x)
        return value

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        constraint = self._constraints.setdefault(name, constraints.real)
        _rows.forget(name)
        self._set(name, value, constraint)

    def __delitem__(self, name: str) -> None:
        self.version += 1
        _rows.forget(name)
        del self._params[name]
        del self._constraints[name]
        del self._transforms[name]

    def _set(self, name: str, value: torch.Tensor, constraint: constraints.Constraint) -> None:
        transform = None if constraint is constraints.real else transform_to(constraint)
        with torch.no_grad():
            if transform is None:
                unconstrained = value
            else:
                unconstrained = transform.inv(value).contiguous()
        # A copy when the value is not a contiguous leaf of its own (a view, e.g. an
        # expanded tensor, cannot be stepped in place); otherwise, as in Pyro, the very tensor.
        if (
            not unconstrained.is_leaf
            or not unconstrained.is_contiguous()
            or (transform is not None and unconstrained is value)
        ):
            unconstrained = unconstrained.detach().clone(memory_format=torch.contiguous_format)
        unconstrained.requires_grad_(True)
        self.version += 1
        self._params[name] = unconstrained
        self._constraints[name] = constraint
        self._transforms[name] = transform

    # Pyro's API ---------------------------------------------------------------------
    def get_param(
        self,
        name: str,
        init_tensor: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        constraint: constraints.Constraint = constraints.real,
        event_dim: int | None = None,
        rows: _rows.RowRequest | None = None,
    ) -> torch.Tensor:
        """The constrained value of ``name``, creating it from ``init_tensor`` if new.

        ``rows`` (set by subsampled plates during an SVI step) asks for only the batch's
        rows; ``rows.done`` then says whether the value already is just those rows.
        """
        if name in self._params:
            if rows is not None:
                value = _rows.read_rows(name, self._params[name], self._transforms[name], rows)
                if value is not None:
                    return value
            return self[name]
        if init_tensor is None:
            raise KeyError(
                f"param {name!r} does not exist and no initial value was given; pass "
                f"an init tensor: param({name!r}, torch.zeros(...))"
            )
        if callable(init_tensor) and not isinstance(init_tensor, torch.Tensor):
            init_tensor = init_tensor()
        if not isinstance(init_tensor, torch.Tensor):
            init_tensor = torch.as_tensor(init_tensor, dtype=torch.get_default_dtype())
        _check_init(name, init_tensor, constraint)
        init_tensor = _rows.shard_init(name, init_tensor, rows)
        self._set(name, init_tensor, constraint)
        return self.get_param(name, rows=rows)

    def setdefault(
        self,
        name: str,
        init_constrained_value: torch.Tensor | Callable[[], torch.Tensor],
        constraint: constraints.Constraint = constraints.real,
    ) -> torch.Tensor:
        """Pyro's older spelling of :meth:`get_param`."""
        return self.get_param(name, init_constrained_value, constraint)

    def replace_param(self, name: str, new_param: torch.Tensor, old_param: torch.Tensor) -> None:
        """Store ``new_param`` (constrained) under ``name``, whose value is ``old_param``."""
        if self[name] is not old_param:
            raise ValueError(f"param {name!r}: old_param is not the stored value")
        self[name] = new_param

    def param_name(self, p: torch.Tensor) -> str | None:
        """The name of an unconstrained tensor of this store, or ``None``."""
        for k, v in self._params.items():
            if v is p:
                return k
        return None

    def get_state(self) -> dict:
        """``{"params": {name: unconstrained}, "constraints": {name: constraint}}``."""
        for p in self._params.values():
            p.__dict__.pop("unconstrained", None)  # so that the state can be torch.save'd
        return {"params": dict(self._params), "constraints": dict(self._constraints)}

    def set_state(self, state: dict) -> None:
        """Load a state from :meth:`get_state` or :meth:`state_dict` (replaces same names)."""
        self.version += 1
        for name, unconstrained in state["params"].items():
            c = state["constraints"][name]
            c = _from_spec(c) if isinstance(c, str) else c
            p = unconstrained.detach().clone().requires_grad_(True)
            self._params[name] = p
            self._constraints[name] = c
            self._transforms[name] = None if c is constraints.real else transform_to(c)

    def state_dict(self) -> dict:
        """Like :meth:`get_state` with constraints as strings: loadable with weights_only."""
        return {
            "params": {k: v.detach() for k, v in self._params.items()},
            "constraints": {k: _spec(c) for k, c in self._constraints.items()},
        }

    def save(self, filename: str) -> None:
        """Write the store to ``filename`` (readable by ``torch.load(weights_only=True)``)."""
        torch.save(self.state_dict(), filename)

    def load(self, filename: str, map_location: Any = None) -> None:
        """Read a file written by :meth:`save` into the store."""
        state = torch.load(filename, map_location=map_location, weights_only=True)
        self.set_state(state)

    @contextlib.contextmanager
    def scope(self, state: dict | None = None) -> Iterator[dict]:
        """Run a block with a store of its own: the block starts from ``state`` (empty by
        default) and what it leaves is yielded, to be passed to a later ``scope``; the
        outer params come back afterwards::

            with store.scope() as first: ...       # train one model
            with store.scope(first): ...           # evaluate it again later
        """
        outer = self.get_state()
        modules = dict(self._modules)
        registry = _rows.registry()
        inner = {"params": {}, "constraints": {}} if state is None else state
        try:
            self.clear()
            self._put(inner)
            yield inner
            inner.update(self.get_state())
        finally:
            self.clear()
            self._put(outer)
            self._modules.update(modules)
            _rows.restore_registry(registry)

    def _put(self, state: dict) -> None:
        """Hold the very tensors of ``state`` (an optimizer keeps its state for them)."""
        for name, p in state["params"].items():
            c = state["constraints"][name]
            c = _from_spec(c) if isinstance(c, str) else c
            self._params[name] = p
            self._constraints[name] = c
            self._transforms[name] = None if c is constraints.real else transform_to(c)


ParamStoreDict = ParamStore  # Pyro's name

_PARAM_STORE = ParamStore()


def get_param_store() -> ParamStore:
    """The global param store, as in Pyro."""
    return _PARAM_STORE


def clear_param_store() -> None:
    """Delete every param of the global store."""
    _PARAM_STORE.clear()


def param_with_module_name(module_name: str, param_name: str) -> str:
    """The store name of a module's param, as Pyro spells it."""
    return f"{module_name}$$${param_name}"


def module_from_param_with_module_name(param_name: str) -> str:
    """The module part of a store name ``module$$$param``."""
    return param_name.split("$$$")[0]


def user_param_name(param_name: str) -> str:
    """The param part of a store name ``module$$$param`` (the name itself without one)."""
    return param_name.split("$$$")[1] if "$$$" in param_name else param_name

"""``PyroModule``: an ``nn.Module`` whose attributes are param and sample sites (Pyro's).

::

    class BayesianRegression(PyroModule):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.linear = PyroModule[nn.Linear](in_features, out_features)
            self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
            self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

        def forward(self, x, y=None):
            mean = self.linear(x).squeeze(-1)   # samples "linear.weight", reads "linear.bias"
            with distsvi.plate("data", x.shape[0]):
                return distsvi.sample("obs", dist.Normal(mean, self.sigma), obs=y)

Inside a call of the root module (``__call__``, or a method decorated with
:func:`pyro_method`) reading an attribute makes a site named by its path from the root
(``"linear.weight"``):

- a :class:`PyroParam` or ``nn.Parameter`` is a ``param`` site. By default its
  unconstrained tensor *is* the param store's entry of that name, so optimizing the store
  trains the module, ``get_param_store().save`` saves it, and a value already in the store
  (loaded from a checkpoint) wins over the module's own;
- a :class:`PyroSample` is a ``sample`` site of its prior (a distribution, or a function of
  the module returning one), drawn once per call and reused within it;
- a plain ``nn.Module`` child is registered with :func:`distsvi.module` under its path.

With ``distsvi.settings.set(module_local_params=True)`` params live in the module alone
(``module.parameters()``, ``state_dict()``), not in the global store; ``SVI`` finds them
through their param sites. Outside a call, attributes read as a plain module's would
(a PyroParam constrained, a PyroSample freshly drawn), making no site.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.distributions import constraints, transform_to

from .params import _PARAM_STORE, param_with_module_name
from .poutine.runtime import _STACK, apply_stack
from .primitives import deterministic, module, new_message, param, sample

__all__ = ["PyroModule", "PyroParam", "PyroSample", "clear", "pyro_method", "to_pyro_module_"]

# Read and set through distsvi.settings ("module_local_params").
_MODULE_LOCAL_PARAMS: bool = False


class PyroParam(NamedTuple):
    """A learnable attribute of a :class:`PyroModule`, like :func:`distsvi.param`.

    ``module.x = PyroParam(torch.ones(3), constraint=constraints.positive, event_dim=1)``

    :param init_value: the initial *constrained* value, or a callable returning it.
    :param constraint: the param's support.
    :param event_dim: how many rightmost dims are event dims (for subsampling plates).
    """

    init_value: torch.Tensor | Callable[[], torch.Tensor] | None = None
    constraint: constraints.Constraint = constraints.real
    event_dim: int | None = None


@dataclass(frozen=True)
class PyroSample:
    """A random attribute of a :class:`PyroModule`, like :func:`distsvi.sample`.

    ``module.w = PyroSample(dist.Normal(0, 1))`` or, to depend on other attributes,
    ``module.w = PyroSample(lambda self: dist.Normal(self.loc, 1))``. A function may also
    return a tensor, recorded as a :func:`distsvi.deterministic` site.

    :param prior: a distribution, or a function of the module returning one.
    """

    prior: Any

    def __post_init__(self) -> None:
        if not (hasattr(self.prior, "sample") or callable(self.prior)):
            raise TypeError(
                f"PyroSample takes a distribution or a function of the module returning "
                f"one, got {self.prior!r}"
            )


class _Context:
    """The state one root module shares with all its sub-modules during a call."""

    def __init__(self) -> None:
        self.active = 0  # nesting depth of calls
        self.used = False  # has the module been called (so that its name is settled)?
        self.cache: dict[str, torch.Tensor] = {}  # sample values drawn in this call

    def __enter__(self) -> None:
        self.active += 1
        self.used = True

    def __exit__(self, *exc_info: object) -> None:
        self.active -= 1
        if not self.active:
            self.cache.clear()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unconstrain(value: torch.Tensor | Callable[[], torch.Tensor], constraint) -> nn.Parameter:
    with torch.no_grad():
        if callable(value) and not isinstance(value, torch.Tensor):
            value = value()
        value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        return nn.Parameter(transform_to(constraint).inv(value.detach()).contiguous())


def _constrained(unconstrained: torch.Tensor, constraint) -> torch.Tensor:
    value = transform_to(constraint)(unconstrained)
    if value is not unconstrained:
        value.unconstrained = weakref.ref(unconstrained)  # how SVI finds a module-local param
    return value


def _local_param_site(
    name: str, value: torch.Tensor, constraint=constraints.real, event_dim: int | None = None
) -> torch.Tensor:
    """A param site whose value the module holds (module-local params)."""
    if not _STACK:
        return value
    msg = new_message(
        "param", name, lambda *_, **__: value, (name, None, constraint), {"event_dim": event_dim}
    )
    apply_stack(msg)
    return msg["value"]


def _store_put(fullname: str, p: torch.Tensor, constraint) -> None:
    store = _PARAM_STORE
    store._params[fullname] = p
    store._constraints[fullname] = constraint
    store._transforms[fullname] = (
        None if constraint is constraints.real else transform_to(constraint)
    )


def _store_adopt(fullname: str, p: nn.Parameter, constraint) -> nn.Parameter:
    """The unconstrained tensor module and store share for ``fullname``: the store's when
    it has one (e.g. loaded from a checkpoint), else ``p``, which the store then holds."""
    stored = _PARAM_STORE._params.get(fullname)
    if stored is None:
        _store_put(fullname, p, constraint)
        return p
    if not isinstance(stored, nn.Parameter):
        # A loaded tensor: wrap it once, before any optimizer sees it (the optimizer
        # tracks tensors by identity).
        stored = nn.Parameter(stored.detach())
        _PARAM_STORE._params[fullname] = stored
    return stored


def _store_module_param(fullname: str, p: nn.Parameter) -> None:
    """Make an ``nn.Parameter`` attribute the store's ``fullname``; a value already in the
    store is copied into it first (as :func:`distsvi.module` does)."""
    stored = _PARAM_STORE._params.get(fullname)
    if stored is p:
        return
    if stored is not None:
        with torch.no_grad():
            p.copy_(stored)
    _store_put(fullname, p, constraints.real)


class _PyroModuleMeta(type):
    _mixins: ClassVar[dict[type, type]] = {}

    def __getitem__(cls, Module: type) -> type:
        """``PyroModule[nn.Linear]``: the class ``nn.Linear`` with PyroModule mixed in."""
        if not (isinstance(Module, type) and issubclass(Module, nn.Module)):
            raise TypeError(f"PyroModule[...] takes an nn.Module class, got {Module!r}")
        if issubclass(Module, PyroModule):
            return Module
        if Module is nn.Module:
            return PyroModule
        if Module not in cls._mixins:
            bases = tuple(PyroModule[b] for b in Module.__bases__ if issubclass(b, nn.Module))
            mixin = type(
                "Pyro" + Module.__name__,
                (Module, *bases),
                {"__module__": __name__, "__reduce__": _reduce_mixin, "_pyro_base": Module},
            )
            cls._mixins[Module] = mixin
        return cls._mixins[Module]


def _reduce_mixin(self: nn.Module) -> tuple:
    # A mixin class has no importable name: pickle it as "the mixin of this base class".
    state = getattr(self, "__getstate__", self.__dict__.copy)()
    return _new_mixin, (type(self)._pyro_base,), state


def _new_mixin(base: type) -> nn.Module:
    obj = PyroModule[base].__new__(PyroModule[base])
    return obj


class PyroModule(nn.Module, metaclass=_PyroModuleMeta):
    """An ``nn.Module`` whose :class:`PyroParam`, :class:`PyroSample`, ``nn.Parameter``
    and module attributes become sites named by their path (see the module docstring).

    ``PyroModule[nn.Linear](3, 1)`` is an ``nn.Linear`` and a PyroModule; a class may also
    list ``PyroModule`` as a base. Sub-PyroModules share their root's name and context,
    so sites are named from the root (``"layer1.weight"``); do not pass a PyroModule to
    :func:`distsvi.module`.

    :param name: the root module's name prefix ("" by default; ignored in sub-modules).
    """

    def __init__(self, name: str = "") -> None:
        self.__dict__["_pyro_name"] = name
        self.__dict__["_pyro_context"] = _Context()
        self.__dict__["_pyro_params"] = OrderedDict()  # name -> (constraint, event_dim)
        self.__dict__["_pyro_samples"] = OrderedDict()  # name -> prior
        super().__init__()

    # naming ------------------------------------------------------------------------
    def add_module(self, name: str, module: nn.Module | None) -> None:
        if isinstance(module, PyroModule):
            module._pyro_set_supermodule(_join(self._pyro_name, name), self._pyro_context)
        super().add_module(name, module)

    def _pyro_set_supermodule(self, name: str, context: _Context) -> None:
        self.__dict__["_pyro_name"] = name
        self.__dict__["_pyro_context"] = context
        for key, child in self._modules.items():
            if isinstance(child, PyroModule):
                if child._pyro_context.used and child._pyro_context is not context:
                    raise RuntimeError(
                        f"sub-module {_join(name, key)!r} was called on its own before it "
                        "joined this module, so its sites already have other names; build "
                        "the whole module before calling it"
                    )
                child._pyro_set_supermodule(_join(name, key), context)

    def _pyro_fullname(self, name: str) -> str:
        return _join(self.__dict__["_pyro_name"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._pyro_context:
            return super().__call__(*args, **kwargs)

    # Pyro's extras -------------------------------------------------------------------
    def named_pyro_params(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, value)`` of the module's params: a :class:`PyroParam` by its own name
        and *constrained* value, an ``nn.Parameter`` as it is."""
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        seen: set[int] = set()
        for mod_prefix, mod in modules:
            for name, p in list(mod._parameters.items()):
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                base = name[: -len("_unconstrained")]
                if (
                    isinstance(mod, PyroModule)
                    and name.endswith("_unconstrained")
                    and (base in mod._pyro_params)
                ):
                    yield _join(mod_prefix, base), _constrained(p, mod._pyro_params[base][0])
                else:
                    yield _join(mod_prefix, name), p

    # attribute access ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name in d.get("_pyro_params", ()):
            return self._pyro_get_param(name)
        if name in d.get("_pyro_samples", ()):
            return self._pyro_get_sample(name)
        result = super().__getattr__(name)
        context = d.get("_pyro_context")
        if context is None:
            return result
        if isinstance(result, nn.Parameter):
            if context.active:
                fullname = self._pyro_fullname(name)
                if _MODULE_LOCAL_PARAMS:
                    _local_param_site(fullname, result)
                else:
                    _store_module_param(fullname, result)
                    param(fullname)
        elif isinstance(result, PyroModule):
            if not result._pyro_name:
                result._pyro_set_supermodule(self._pyro_fullname(name), context)
        elif isinstance(result, nn.Module) and context.active:
            fullname = self._pyro_fullname(name)
            if _MODULE_LOCAL_PARAMS:
                for pname, p in result.named_parameters():
                    _local_param_site(param_with_module_name(fullname, pname), p)
            else:
                module(fullname, result)
        return result

    def _pyro_get_param(self, name: str) -> torch.Tensor:
        constraint, event_dim = self._pyro_params[name]
        unconstrained = self._parameters[name + "_unconstrained"]
        if not self._pyro_context.active:
            return _constrained(unconstrained, constraint)
        fullname = self._pyro_fullname(name)
        if _MODULE_LOCAL_PARAMS:
            return _local_param_site(
                fullname, _constrained(unconstrained, constraint), constraint, event_dim
            )
        p = _store_adopt(fullname, unconstrained, constraint)
        if p is not unconstrained:
            self._parameters[name + "_unconstrained"] = p
        return param(fullname, event_dim=event_dim)

    def _pyro_get_sample(self, name: str) -> torch.Tensor:
        prior = self._pyro_samples[name]
        context = self._pyro_context
        if not context.active:
            if not hasattr(prior, "sample"):
                prior = prior(self)
            return prior if isinstance(prior, torch.Tensor) else prior()
        fullname = self._pyro_fullname(name)
        value = context.cache.get(fullname)
        if value is None:
            if not hasattr(prior, "sample"):
                prior = prior(self)
            if isinstance(prior, torch.Tensor):
                value = deterministic(fullname, prior)
            else:
                value = sample(fullname, prior)
            context.cache[fullname] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, PyroModule):
            self._pyro_drop(name)
            self.add_module(name, value)
        elif isinstance(value, PyroParam):
            self._pyro_drop(name)
            init, constraint, event_dim = value
            if init is None:
                raise ValueError(f"PyroParam for attribute {name!r} needs an initial value")
            self._pyro_params[name] = (constraint, event_dim)
            p = _unconstrain(init, constraint)
            if self._pyro_context.active and not _MODULE_LOCAL_PARAMS:
                p = _store_adopt(self._pyro_fullname(name), p, constraint)
            super().__setattr__(name + "_unconstrained", p)
        elif isinstance(value, nn.Parameter):
            self._pyro_drop(name)
            if self._pyro_context.active and not _MODULE_LOCAL_PARAMS:
                _store_module_param(self._pyro_fullname(name), value)
            super().__setattr__(name, value)
        elif isinstance(value, torch.Tensor) and name in self.__dict__.get("_pyro_params", ()):
            constraint = self._pyro_params[name][0]
            p = self._parameters[name + "_unconstrained"]
            with torch.no_grad():
                p.data = transform_to(constraint).inv(value.detach())
        elif isinstance(value, PyroSample):
            self._pyro_drop(name)
            self._pyro_samples[name] = value.prior
        else:
            super().__setattr__(name, value)

    def _pyro_drop(self, name: str) -> None:
        try:
            delattr(self, name)
        except AttributeError:
            pass

    def __delattr__(self, name: str) -> None:
        """Deleting a param attribute also deletes it from the param store (once called)."""
        used = self._pyro_context.used
        if name in self._parameters or name in self._pyro_params:
            if name in self._pyro_params:
                del self._pyro_params[name]
                del self._parameters[name + "_unconstrained"]
            else:
                del self._parameters[name]
            if used and self._pyro_fullname(name) in _PARAM_STORE:
                del _PARAM_STORE[self._pyro_fullname(name)]
        elif name in self._pyro_samples:
            del self._pyro_samples[name]
        elif name in self._modules:
            del self._modules[name]
            if used:
                prefix = self._pyro_fullname(name)
                inside = (prefix + ".", prefix + "$$$")
                for key in [k for k in _PARAM_STORE if k == prefix or k.startswith(inside)]:
                    del _PARAM_STORE[key]
        else:
            super().__delattr__(name)

    def __getstate__(self) -> dict:
        for p in self.parameters():
            p.__dict__.pop("unconstrained", None)  # a weakref does not pickle
        return self.__dict__.copy()


def pyro_method(fn: Callable) -> Callable:
    """Decorate a method of a :class:`PyroModule` other than ``forward`` that reads its
    sites, so that it makes them (and draws each sample once) as ``__call__`` does."""

    @functools.wraps(fn)
    def method(self: PyroModule, *args: Any, **kwargs: Any) -> Any:
        with self._pyro_context:
            return fn(self, *args, **kwargs)

    return method


def clear(mod: PyroModule) -> None:
    """Delete the params and sub-modules of ``mod``, from it and from the param store."""
    if not isinstance(mod, PyroModule):
        raise TypeError(f"clear() takes a PyroModule, got {type(mod).__name__}")
    for names in (mod._pyro_params, mod._parameters, mod._modules):
        for name in list(names):
            delattr(mod, name)


def to_pyro_module_(m: nn.Module, recurse: bool = True) -> None:
    """Turn the module ``m`` (and its children, with ``recurse``) into a PyroModule in place."""
    if not isinstance(m, nn.Module):
        raise TypeError(f"to_pyro_module_ takes an nn.Module instance, got {type(m).__name__}")
    if not isinstance(m, PyroModule):
        m.__class__ = PyroModule[type(m)]
        m.__dict__.update(
            _pyro_name="", _pyro_context=_Context(), _pyro_params=OrderedDict(),
            _pyro_samples=OrderedDict(),
        )  # fmt: skip
    for name, child in list(m._modules.items()):
        if recurse and child is not None:
            to_pyro_module_(child)
        if child is not None:
            setattr(m, name, child)

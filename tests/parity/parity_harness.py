"""Run one model/guide pair under Pyro and under distsvi and compare the numbers.

Monte-Carlo draws are made equal by construction: guides sample from "fixed-draw"
subclasses of each backend's own distribution classes, whose ``rsample``/``sample``
return a value computed from pre-drawn noise (``loc + scale * eps`` for a Normal), so the
reparameterised path, and hence every gradient, is the same as with fresh noise while the
value is identical in both engines and at every step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable
from typing import Any

import torch

RTOL = 1e-5
_SCALAR = torch.Size()
ATOL = 1e-9


@functools.cache
def backend(name: str) -> types.SimpleNamespace:
    """The engine's public modules under Pyro's names: ``pyro``, ``dist``, ``poutine``, ..."""
    root = importlib.import_module(name)
    dist = importlib.import_module(f"{name}.distributions")
    return types.SimpleNamespace(
        name=name,
        pyro=root,
        dist=dist,
        constraints=dist.constraints,
        poutine=importlib.import_module(f"{name}.poutine"),
        infer=importlib.import_module(f"{name}.infer"),
        optim=importlib.import_module(f"{name}.optim"),
    )


def both() -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    return backend("pyro"), backend("distsvi")


@contextlib.contextmanager
def torch_without_pyro_kl():
    """Importing pyro registers its own KL rules in torch's global registry; distsvi must be
    judged on torch's rules alone, as in a process where pyro is not installed."""
    from torch.distributions import kl

    saved = dict(kl._KL_REGISTRY)
    for key, fn in saved.items():
        if fn.__module__.startswith("pyro"):
            original = getattr(kl, fn.__name__, None)  # a torch rule pyro overrode
            if original is not None and original.__module__ == kl.__name__:
                kl._KL_REGISTRY[key] = original
            else:
                del kl._KL_REGISTRY[key]
    kl._KL_MEMOIZE.clear()
    try:
        yield
    finally:
        kl._KL_REGISTRY.clear()
        kl._KL_REGISTRY.update(saved)
        kl._KL_MEMOIZE.clear()


def isolated(B):
    """The context to run backend ``B`` in (distsvi without pyro's KL rules)."""
    return torch_without_pyro_kl() if B.name == "distsvi" else contextlib.nullcontext()


_FIXED_CLASSES: dict[tuple[str, str], type] = {}


def _fixed_class(B: types.SimpleNamespace, cls_name: str) -> type:
    key = (B.name, cls_name)
    if key not in _FIXED_CLASSES:
        base = getattr(B.dist, cls_name)

        def rsample(self, sample_shape=_SCALAR):
            assert tuple(sample_shape) == (), "fixed-draw distributions draw one value"
            return self._draw(self)

        def sample(self, sample_shape=_SCALAR):
            with torch.no_grad():
                return rsample(self, sample_shape).detach()

        def expand(self, batch_shape, _instance=None):
            new = base.expand(self, batch_shape, _instance)
            new._draw = self._draw
            return new

        body = {"sample": sample, "expand": expand}
        if base.has_rsample:
            body["rsample"] = rsample
        _FIXED_CLASSES[key] = type(f"Fixed{cls_name}", (base,), body)
    return _FIXED_CLASSES[key]


def fixed(B: types.SimpleNamespace, cls_name: str, *args: Any, draw: Callable, **kwargs: Any):
    """``B.dist.<cls_name>(*args, **kwargs)`` whose draw is ``draw(d)`` (differentiable if
    the class is reparameterised)."""
    d = _fixed_class(B, cls_name)(*args, **kwargs)
    d._draw = draw
    return d


def fixed_normal(B, loc, scale, eps):
    return fixed(B, "Normal", loc, scale, draw=lambda d: d.loc + d.scale * eps)


def fixed_lognormal(B, loc, scale, eps):
    return fixed(B, "LogNormal", loc, scale, draw=lambda d: (d.loc + d.scale * eps).exp())


def fixed_value(B, cls_name, *args, value, **kwargs):
    """A non-reparameterised draw: always ``value`` (broadcast to the batch shape)."""
    return fixed(
        B, cls_name, *args, draw=lambda d: value.expand(d.batch_shape + d.event_shape), **kwargs
    )


def bind(fn: Callable, B: types.SimpleNamespace) -> Callable:
    """Model code is written ``fn(B, *args)``; the engines see ``fn(*args)``."""
    return functools.partial(fn, B)


def unconstrained(B) -> dict[str, torch.Tensor]:
    return {n: p for n, p in B.pyro.get_param_store().named_parameters()}


def loss_and_grads(B, model, guide, args=(), kwargs=None, loss="Trace_ELBO", loss_kwargs=None):
    """One ``loss_and_grads`` from a fresh param store: (loss, {name: grad}, {name: value})."""
    B.pyro.clear_param_store()
    torch.manual_seed(0)
    elbo = getattr(B.infer, loss)(**(loss_kwargs or {}))
    with isolated(B):
        value = elbo.loss_and_grads(bind(model, B), bind(guide, B), *args, **(kwargs or {}))
    params = unconstrained(B)
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
    values = {n: p.detach().clone() for n, p in params.items()}
    B.pyro.clear_param_store()
    return float(value), grads, values


def train(
    B,
    model,
    guide,
    make_optim: Callable,
    steps: int,
    args=(),
    kwargs=None,
    loss="Trace_ELBO",
    loss_kwargs=None,
    after_step: Callable | None = None,
):
    """``steps`` SVI steps from a fresh store: (losses, {name: unconstrained value})."""
    B.pyro.clear_param_store()
    torch.manual_seed(0)
    optim = make_optim(B)
    elbo = getattr(B.infer, loss)(**(loss_kwargs or {}))
    svi = B.infer.SVI(bind(model, B), bind(guide, B), optim, elbo)
    losses = []
    with isolated(B):
        for i in range(steps):
            losses.append(svi.step(*args, **(kwargs or {})))
            if after_step is not None:
                after_step(B, optim, i, losses[-1])
    values = {n: p.detach().clone() for n, p in unconstrained(B).items()}
    B.pyro.clear_param_store()
    return losses, values


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=RTOL,
        atol=ATOL,
        msg=lambda m: f"{what}: distsvi differs from Pyro\n{m}",
    )


def assert_same_params(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: param names {sorted(got)} != Pyro's {sorted(want)}"
    for name, w in want.items():
        g = got[name]
        if w is None or g is None:
            assert g is None and w is None, f"{what} of {name!r}: distsvi {g} vs Pyro {w}"
            continue
        assert g.shape == w.shape, f"{what} of {name!r}: shape differs"
        assert_close(g, w, f"{what} of {name!r}")

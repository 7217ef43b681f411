"""Pyro's optimizer surface under Pyro 1.9.2 and distsvi: the torch classes at Pyro's module
paths, AdagradRMSProp, schedulers' attributes, and ``get_state`` in Pyro's layout (each
engine loads the other's state and carries on as if uninterrupted)."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, assert_same_params, both, unconstrained
from test_parity_optim import DATA, SCHEDULERS, _check, _trajectories, guide, model


# -- the torch optimizer classes, used directly ------------------------------------------
def _torch_run(cls, kwargs, steps=10, skip=()):
    """Minimise a fixed quadratic in two tensors; tensor ``b`` has no grad on steps ``skip``."""
    torch.manual_seed(3)
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)
    target = torch.linspace(-4.0, 4.0, 7)
    opt = cls(
        [{"params": [a]}, {"params": [b], "lr": 0.05} if "lr" in kwargs else {"params": [b]}],
        **kwargs,
    )
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        use_b = i not in skip
        x = torch.cat([a, b.flatten()]) if use_b else torch.cat([a, b.detach().flatten()])
        ((x - target[: len(x)]) ** 2 * 30).sum().backward()  # gradients beyond clip_norm
        opt.step()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [a.detach(), b.detach()], groups


TORCH_CLASSES = {
    "ClippedAdam": ("clipped_adam", {"lr": 0.1, "clip_norm": 2.0, "lrd": 0.9, "weight_decay": 0.1}),
    "ClippedAdam-centered": (
        "clipped_adam",
        {"lr": 0.1, "clip_norm": 5.0, "lrd": 0.95, "centered_variance": True},
    ),
    "AdagradRMSProp": ("adagrad_rmsprop", {"eta": 0.5, "delta": 1e-3, "t": 0.3}),
}


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
@pytest.mark.parametrize("skip", [(), (2, 3, 7)], ids=["every-step", "b-sits-out"])
def test_torch_class_at_pyros_module_path(name, skip):
    module, kwargs = TORCH_CLASSES[name]
    cls_name = name.split("-")[0]
    if cls_name == "AdagradRMSProp" and skip:
        pytest.skip("Pyro's AdagradRMSProp needs every param's grad at every step")
    results = []
    for package in ("pyro", "distsvi"):
        cls = getattr(importlib.import_module(f"{package}.optim.{module}"), cls_name)
        assert issubclass(cls, torch.optim.Optimizer)
        results.append(_torch_run(cls, dict(kwargs), skip=skip))
    (want, want_groups), (got, got_groups) = results
    for g, w, which in zip(got, want, "ab", strict=True):
        assert_close(g, w, f"{name}: tensor {which} after 10 steps")
    assert got_groups == want_groups, f"{name}: param groups (decayed lr) differ"


# -- the wrappers ------------------------------------------------------------------------
def test_adagrad_rmsprop_trajectory():
    def make(B):
        return B.optim.AdagradRMSProp({"eta": 0.3, "t": 0.2})

    _check(_trajectories(make, steps=10), "AdagradRMSProp")


def test_adagrad_rmsprop_per_param_options():
    etas = {"a_map": 0.5, "b_map": 0.1, "noise": 0.2, "c": 0.05}

    def make(B):
        return B.optim.AdagradRMSProp(lambda name: {"eta": etas[name]})

    _check(_trajectories(make, steps=10), "AdagradRMSProp with per-param eta")


@pytest.mark.parametrize("scheduler", ["ExponentialLR", "StepLR"])
def test_scheduler_over_clipped_adam(scheduler):
    """A chainable schedule over ClippedAdam's own decay, as Pyro compounds the two."""
    from pyro.optim.clipped_adam import ClippedAdam as PyroClippedAdam

    from distsvi.optim.clipped_adam import ClippedAdam as DistsviClippedAdam

    def make(B):
        cls = PyroClippedAdam if B.name == "pyro" else DistsviClippedAdam
        args = {**SCHEDULERS[scheduler](), "optimizer": cls}
        args["optim_args"] = {"lr": 0.1, "lrd": 0.9, "clip_norm": 3.0}
        return getattr(B.optim, scheduler)(args)

    def after_step(B, optim, i, loss):
        optim.step()

    _check(_trajectories(make, steps=10, after_step=after_step), f"{scheduler}(ClippedAdam)")


def test_scheduler_attributes():
    for B in both():
        sched = B.optim.ExponentialLR(SCHEDULERS["ExponentialLR"]())
        assert sched.pt_scheduler_constructor is torch.optim.lr_scheduler.ExponentialLR
        assert sched.kwargs == {"gamma": 0.8}
        assert sched.optim_objs == {}


def _run_with_late_param(B, optim, steps, first=0, after=None):
    svi = B.infer.SVI(
        functools.partial(model, B), functools.partial(guide, B), optim, B.infer.Trace_ELBO()
    )
    losses = []
    for i in range(first, first + steps):
        losses.append(svi.step(DATA, use_c=i >= 3))
        if after is not None:
            after(optim)
    return losses


def test_optim_objs_per_param_view():
    """``optim_objs[p]``: one entry per param tensor, whose lr and state are that param's."""
    views = []
    for B in both():
        B.pyro.clear_param_store()
        sched = B.optim.StepLR(SCHEDULERS["StepLR"]())
        _run_with_late_param(B, sched, 7, after=lambda s: s.step())
        params = unconstrained(B)
        objs = sched.optim_objs
        assert set(map(id, objs)) == {id(p) for p in params.values()}
        store = B.pyro.get_param_store()
        views.append(
            {
                store.param_name(p): (
                    s.get_last_lr(),
                    s.optimizer.param_groups[0]["lr"],
                    s.last_epoch,
                    s.state_dict()["last_epoch"],
                    sorted(s.optimizer.state[p]),
                )
                for p, s in objs.items()
            }
        )
    want, got = views
    assert got == want
    assert want["c"][2] < want["a_map"][2]  # the late param's schedule started later


# -- get_state in Pyro's layout ----------------------------------------------------------
MAKERS = {
    "Adam": lambda B: B.optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)}),
    "ClippedAdam": lambda B: B.optim.ClippedAdam({"lr": 0.2, "lrd": 0.8, "clip_norm": 1.0}),
    "AdagradRMSProp": lambda B: B.optim.AdagradRMSProp({"eta": 0.3}),
    "ExponentialLR": lambda B: B.optim.ExponentialLR(SCHEDULERS["ExponentialLR"]()),
    "ReduceLROnPlateau": lambda B: B.optim.ReduceLROnPlateau(SCHEDULERS["ReduceLROnPlateau"]()),
}


def _after(name):
    if name == "ReduceLROnPlateau":
        return lambda optim, loss: optim.step(loss)
    if name == "ExponentialLR":
        return lambda optim, loss: optim.step()
    return None


def _steps(B, optim, name, first, steps):
    """SVI steps ``first .. first+steps-1`` (param ``c`` from step 4), schedule stepped."""
    svi = B.infer.SVI(
        functools.partial(model, B), functools.partial(guide, B), optim, B.infer.Trace_ELBO()
    )
    after = _after(name)
    losses = []
    for i in range(first, first + steps):
        losses.append(svi.step(DATA, use_c=i >= 3))
        if after is not None:
            after(optim, losses[-1])
    return losses


def _structure(entry):
    """Keys all the way down, and the state tensors' names (not their values)."""
    if isinstance(entry, dict):
        return {k: _structure(v) for k, v in entry.items()}
    if isinstance(entry, list | tuple):
        return [_structure(v) for v in entry]
    return type(entry).__name__ if torch.is_tensor(entry) else "value"


def _values(entry, prefix=""):
    if isinstance(entry, dict):
        for k, v in entry.items():
            yield from _values(v, f"{prefix}/{k}")
    elif isinstance(entry, list | tuple):
        for i, v in enumerate(entry):
            yield from _values(v, f"{prefix}[{i}]")
    else:
        yield prefix, entry


@pytest.mark.parametrize("name", list(MAKERS))
def test_get_state_layout_is_pyros(name):
    states = []
    for B in both():
        B.pyro.clear_param_store()
        optim = MAKERS[name](B)
        _steps(B, optim, name, 0, 6)
        states.append(optim.get_state())
    want, got = states
    assert set(got) == set(want) == {"a_map", "b_map", "noise", "c"}
    for param in want:
        assert _structure(got[param]) == _structure(want[param]), f"{name}: layout of {param!r}"
        for (path, w), (_, g) in zip(_values(want[param]), _values(got[param]), strict=True):
            if path.endswith("/foreach"):  # distsvi picks foreach kernels; Pyro leaves None
                continue
            if torch.is_tensor(w) or isinstance(w, float):
                assert_close(g, w, f"{name}: {param}{path}")
            else:
                assert g == w, f"{name}: {param}{path}: distsvi {g!r}, Pyro {w!r}"


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("direction", ["pyro-to-distsvi", "distsvi-to-pyro"])
def test_state_crosses_engines(name, direction, tmp_path):
    """Six steps in one engine, its param store and get_state() loaded into the other, four
    more there: the same as Pyro's ten uninterrupted steps."""
    pyro_b, distsvi_b = both()
    pyro_b.pyro.clear_param_store()
    want_losses = _steps(pyro_b, MAKERS[name](pyro_b), name, 0, 10)
    want = {n: p.detach().clone() for n, p in unconstrained(pyro_b).items()}

    first, second = (pyro_b, distsvi_b) if direction == "pyro-to-distsvi" else (distsvi_b, pyro_b)
    first.pyro.clear_param_store()
    optim = MAKERS[name](first)
    losses = _steps(first, optim, name, 0, 6)
    state = optim.get_state()
    params = {n: first.pyro.param(n).detach().clone() for n in first.pyro.get_param_store()}
    second.pyro.clear_param_store()
    for n in reversed(list(params)):  # created in another order
        constraint = {"constraint": second.constraints.positive} if n == "noise" else {}
        second.pyro.param(n, params[n], **constraint)
    optim2 = MAKERS[name](second)
    optim2.set_state(state)
    losses += _steps(second, optim2, name, 6, 4)
    got = {n: p.detach().clone() for n, p in unconstrained(second).items()}
    second.pyro.clear_param_store()
    assert_close(losses, want_losses, f"{name} {direction}: losses")
    assert_same_params(got, want, f"{name} {direction}: params")

"""Optimizer and scheduler parity with Pyro 1.9.2: params after several SVI steps.

The model has a Delta (MAP) guide, so a step is deterministic and two engines given the
same optimizer semantics must follow the same trajectory.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import assert_close, assert_same_params, both, train, unconstrained

_g = torch.Generator().manual_seed(99)
N = 20
DATA = 4.0 + torch.randn(N, generator=_g, dtype=torch.float64)


def model(B, x, use_c=True):
    a = B.pyro.sample("a", B.dist.Normal(0.0, 2.0))
    b = B.pyro.sample("b", B.dist.Normal(torch.zeros(2), 1.0).to_event(1))
    noise = B.pyro.param("noise", torch.tensor(0.5), constraint=B.constraints.positive)
    shift = B.pyro.param("c", torch.tensor(-1.0)) if use_c else 0.0
    with B.pyro.plate("data", len(x)):
        B.pyro.sample("obs", B.dist.Normal(a + b.sum() + shift, noise), obs=x)


def guide(B, x, use_c=True, reverse=False):
    def a():
        B.pyro.sample("a", B.dist.Delta(B.pyro.param("a_map", torch.tensor(3.0))))

    def b():
        b_map = B.pyro.param("b_map", torch.tensor([-1.0, 2.0]))
        B.pyro.sample("b", B.dist.Delta(b_map, event_dim=1))

    for site in (b, a) if reverse else (a, b):
        site()


def guide_fwd(B, x, use_c=True):
    guide(B, x, use_c)


def _trajectories(make_optim, steps=8, after_step=None):
    return [
        train(B, model, guide_fwd, make_optim, steps, (DATA,), after_step=after_step)
        for B in both()
    ]


def _check(results, what):
    (want_losses, want), (losses, got) = results
    assert_close(losses, want_losses, f"{what}: per-step losses")
    assert_same_params(got, want, f"{what}: params")


def test_gradients_exceed_clip_norm():
    """The ClippedAdam test below is only meaningful if clipping bites: check it does."""
    B, _ = both()
    B.pyro.clear_param_store()
    B.infer.Trace_ELBO().loss_and_grads(lambda x: model(B, x), lambda x: guide_fwd(B, x), DATA)
    assert max(p.grad.abs().max().item() for p in unconstrained(B).values()) > 5.0


def test_clipped_adam_clip_norm_and_lrd():
    def make(B):
        return B.optim.ClippedAdam(
            {"lr": 0.1, "clip_norm": 0.5, "lrd": 0.9, "betas": (0.9, 0.99), "weight_decay": 0.01}
        )

    _check(_trajectories(make, steps=10), "ClippedAdam")


def test_clipped_adam_lrd_with_intermittent_param():
    """A param touched on some steps only: in Pyro its lr decays only on steps that update it."""
    results = []
    for B in both():
        B.pyro.clear_param_store()
        optim = B.optim.ClippedAdam({"lr": 0.2, "clip_norm": 2.0, "lrd": 0.7})
        svi = B.infer.SVI(
            functools.partial(model, B),
            functools.partial(guide, B),
            optim,
            B.infer.Trace_ELBO(),
        )
        losses = [svi.step(DATA, use_c=(i % 3 == 0)) for i in range(9)]
        results.append((losses, {n: p.detach().clone() for n, p in unconstrained(B).items()}))
    _check(results, "ClippedAdam with a param used every third step")


def test_adam_with_late_param():
    """A param that first appears at step 4 gets fresh optimizer state then."""
    results = []
    for B in both():
        B.pyro.clear_param_store()
        svi = B.infer.SVI(
            functools.partial(model, B),
            functools.partial(guide, B),
            B.optim.Adam({"lr": 0.1}),
            B.infer.Trace_ELBO(),
        )
        losses = [svi.step(DATA, use_c=i >= 3) for i in range(7)]
        results.append((losses, {n: p.detach().clone() for n, p in unconstrained(B).items()}))
    _check(results, "Adam with a param appearing at step 4")


def test_per_param_optim_callable():
    lrs = {"a_map": 0.3, "b_map": 0.01, "noise": 0.05, "c": 0.0}

    def make(B):
        return B.optim.Adam(lambda name: {"lr": lrs[name], "betas": (0.9, 0.999)})

    results = _trajectories(make)
    _check(results, "Adam with per-param callable")
    assert results[1][1]["c"].item() == -1.0  # lr 0 keeps its initial value


@pytest.mark.parametrize(
    "name,args",
    [
        ("Adam", {"lr": 0.05}),
        ("SGD", {"lr": 0.002, "momentum": 0.9}),
        ("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
        ("RMSprop", {"lr": 0.01}),
        ("Adagrad", {"lr": 0.1}),
    ],
)
def test_optimizer_trajectory(name, args):
    def make(B):
        return getattr(B.optim, name)(dict(args))

    _check(_trajectories(make), name)


SCHEDULERS = {
    "ExponentialLR": lambda: {
        "optimizer": torch.optim.Adam,
        "optim_args": {"lr": 0.1},
        "gamma": 0.8,
    },
    "StepLR": lambda: {
        "optimizer": torch.optim.SGD,
        "optim_args": {"lr": 0.002},
        "step_size": 2,
        "gamma": 0.5,
    },
    "OneCycleLR": lambda: {
        "optimizer": torch.optim.SGD,
        "optim_args": {"lr": 0.002, "momentum": 0.9},
        "max_lr": 0.01,
        "total_steps": 12,
    },
    "ReduceLROnPlateau": lambda: {
        "optimizer": torch.optim.Adam,
        "optim_args": {"lr": 0.5},
        "factor": 0.5,
        "patience": 0,
    },
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_trajectory(name):
    def make(B):
        return getattr(B.optim, name)(SCHEDULERS[name]())

    def after_step(B, scheduler, i, loss):
        if name == "ReduceLROnPlateau":
            scheduler.step(loss)
        else:
            scheduler.step()

    _check(_trajectories(make, steps=10, after_step=after_step), name)


def test_generic_scheduler_wrapper():
    def make(B):
        return B.optim.PyroLRScheduler(
            torch.optim.lr_scheduler.LambdaLR,
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": 0.2},
                "lr_lambda": lambda epoch: 1.0 / (1.0 + epoch),
            },
        )

    def after_step(B, scheduler, i, loss):
        scheduler.step()

    _check(_trajectories(make, steps=8, after_step=after_step), "PyroLRScheduler(LambdaLR)")


CONSTRAINTS = {"a_map": None, "b_map": None, "noise": "positive", "c": None}


def _resumed_run(B, tmp_path, steps_before, steps_after):
    """Train, save param store and optimizer state, rebuild the store in reversed creation
    order, load, and carry on with a guide that touches its params in reversed order."""
    B.pyro.clear_param_store()
    optim = B.optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})
    elbo = B.infer.Trace_ELBO()
    svi = B.infer.SVI(lambda x: model(B, x), lambda x: guide(B, x), optim, elbo)
    for _ in range(steps_before):
        svi.step(DATA)
    path = tmp_path / f"{B.name}_optim.pt"
    optim.save(str(path))
    saved = {n: B.pyro.param(n).detach().clone() for n in B.pyro.get_param_store()}

    B.pyro.clear_param_store()
    for name in reversed(list(saved)):
        c = CONSTRAINTS[name]
        if c is None:
            B.pyro.param(name, saved[name].clone())
        else:
            B.pyro.param(name, saved[name].clone(), constraint=getattr(B.constraints, c))
    optim2 = B.optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})
    optim2.load(str(path))
    svi2 = B.infer.SVI(
        lambda x: model(B, x), lambda x: guide(B, x, reverse=True), optim2, B.infer.Trace_ELBO()
    )
    losses = [svi2.step(DATA) for _ in range(steps_after)]
    return losses, {n: p.detach().clone() for n, p in unconstrained(B).items()}


def test_optim_state_resume_in_another_order(tmp_path):
    pyro_b, distsvi_b = both()

    def make(B):
        return B.optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})

    want_losses, want = train(pyro_b, model, guide_fwd, make, 6, (DATA,))
    got_losses, got = _resumed_run(distsvi_b, tmp_path, 3, 3)
    assert_close(got_losses, want_losses[3:], "losses after resuming")
    assert_same_params(got, want, "params after resuming (vs Pyro uninterrupted)")


def test_clip_args():
    def make(B):
        return B.optim.Adam({"lr": 0.1}, {"clip_norm": 0.5})

    _check(_trajectories(make), "Adam with clip_args clip_norm")

    def make_value(B):
        return B.optim.SGD({"lr": 0.01}, {"clip_value": 0.3})

    _check(_trajectories(make_value), "SGD with clip_args clip_value")


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR", "OneCycleLR"])
def test_scheduler_with_late_param(name):
    """Pyro keeps one scheduler per param, started when the param first appears."""
    results = []
    for B in both():
        B.pyro.clear_param_store()
        scheduler = getattr(B.optim, name)(SCHEDULERS[name]())
        svi = B.infer.SVI(
            functools.partial(model, B),
            functools.partial(guide, B),
            scheduler,
            B.infer.Trace_ELBO(),
        )
        losses = []
        for i in range(9):
            losses.append(svi.step(DATA, use_c=i >= 3))
            scheduler.step()
        results.append((losses, {n: p.detach().clone() for n, p in unconstrained(B).items()}))
    _check(results, f"{name} with a param appearing at step 4")


@pytest.mark.parametrize(
    "make",
    [
        lambda B: B.optim.Adam({"lr": 0.1}),
        lambda B: B.optim.ClippedAdam({"lr": 0.1, "lrd": 0.8, "clip_norm": 1.0}),
    ],
    ids=["Adam", "ClippedAdam"],
)
def test_optimizer_reused_after_clear_param_store(make):
    """New param tensors of the same names get fresh optimizer state, as in Pyro."""
    results = []
    for B in both():
        B.pyro.clear_param_store()
        optim = make(B)
        losses = []
        for _ in range(2):
            svi = B.infer.SVI(
                functools.partial(model, B),
                functools.partial(guide_fwd, B),
                optim,
                B.infer.Trace_ELBO(),
            )
            losses += [svi.step(DATA) for _ in range(3)]
            B.pyro.clear_param_store()
            losses += [svi.step(DATA) for _ in range(2)]
        results.append((losses, {n: p.detach().clone() for n, p in unconstrained(B).items()}))
    _check(results, "optimizer reused across clear_param_store")


RESUMABLE = {
    "ClippedAdam": (lambda B: B.optim.ClippedAdam({"lr": 0.2, "lrd": 0.8, "clip_norm": 1.0}), None),
    "SGD_momentum": (lambda B: B.optim.SGD({"lr": 0.002, "momentum": 0.9}), None),
    "StepLR": (lambda B: B.optim.StepLR(SCHEDULERS["StepLR"]()), "step"),
    "OneCycleLR": (lambda B: B.optim.OneCycleLR(SCHEDULERS["OneCycleLR"]()), "step"),
    "ReduceLROnPlateau": (
        lambda B: B.optim.ReduceLROnPlateau(SCHEDULERS["ReduceLROnPlateau"]()),
        "metric",
    ),
}


def _steps(B, optim, how, n, svi=None):
    svi = svi or B.infer.SVI(
        functools.partial(model, B), functools.partial(guide_fwd, B), optim, B.infer.Trace_ELBO()
    )
    losses = []
    for _ in range(n):
        losses.append(svi.step(DATA))
        if how == "step":
            optim.step()
        elif how == "metric":
            optim.step(losses[-1])
    return losses


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_from_saved_optimizer_state(name, tmp_path):
    """Save the param store and optimizer after 4 steps, load both into fresh objects, take
    4 more: the same as Pyro's 8 uninterrupted steps."""
    make, how = RESUMABLE[name]
    pyro_b, distsvi_b = both()
    pyro_b.pyro.clear_param_store()
    want_losses = _steps(pyro_b, make(pyro_b), how, 8)
    want = {n: p.detach().clone() for n, p in unconstrained(pyro_b).items()}

    B = distsvi_b
    B.pyro.clear_param_store()
    optim = make(B)
    losses = _steps(B, optim, how, 4)
    optim.save(str(tmp_path / "optim.pt"))
    B.pyro.get_param_store().save(str(tmp_path / "params.pt"))
    B.pyro.clear_param_store()
    B.pyro.get_param_store().load(str(tmp_path / "params.pt"))
    optim2 = make(B)
    optim2.load(str(tmp_path / "optim.pt"))
    losses += _steps(B, optim2, how, 4)
    got = {n: p.detach().clone() for n, p in unconstrained(B).items()}
    assert_close(losses, want_losses, f"{name}: losses across a save/load")
    assert_same_params(got, want, f"{name}: params after resuming")


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR"])
def test_resume_scheduler_with_a_late_param(name, tmp_path):
    """A param born at step 4 has its own schedule; saving at step 6 and resuming (params
    recreated in reversed order) must continue both schedules as Pyro's uninterrupted run."""

    def run(B, optim, steps, first):
        svi = B.infer.SVI(
            functools.partial(model, B), functools.partial(guide, B), optim, B.infer.Trace_ELBO()
        )
        losses = []
        for i in range(first, first + steps):
            losses.append(svi.step(DATA, use_c=i >= 3))
            optim.step()
        return losses

    pyro_b, B = both()
    pyro_b.pyro.clear_param_store()
    want_losses = run(pyro_b, getattr(pyro_b.optim, name)(SCHEDULERS[name]()), 10, 0)
    want = {n: p.detach().clone() for n, p in unconstrained(pyro_b).items()}

    B.pyro.clear_param_store()
    optim = getattr(B.optim, name)(SCHEDULERS[name]())
    losses = run(B, optim, 6, 0)
    optim.save(str(tmp_path / "optim.pt"))
    saved = {n: B.pyro.param(n).detach().clone() for n in B.pyro.get_param_store()}
    B.pyro.clear_param_store()
    for n in reversed(list(saved)):
        c = CONSTRAINTS[n]
        B.pyro.param(n, saved[n], **({"constraint": getattr(B.constraints, c)} if c else {}))
    optim2 = getattr(B.optim, name)(SCHEDULERS[name]())
    optim2.load(str(tmp_path / "optim.pt"))
    losses += run(B, optim2, 4, 6)
    got = {n: p.detach().clone() for n, p in unconstrained(B).items()}
    assert_close(losses, want_losses, f"{name}: losses across a save/load")
    assert_same_params(got, want, f"{name}: params after resuming")


def test_clipped_adam_centered_variance():
    def make(B):
        return B.optim.ClippedAdam({"lr": 0.1, "clip_norm": 2.0, "centered_variance": True})

    _check(_trajectories(make), "ClippedAdam(centered_variance=True)")

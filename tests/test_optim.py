"""Optimizers and schedulers: Pyro's interface, state keyed by param name, resumption.

The model has a Delta guide, so its loss is deterministic: ``0.5 * sum(x_map**2)`` plus a
constant, with gradient ``x_map``. Expected trajectories come from the same update run by
hand with torch's optimizers and schedulers.
"""

from __future__ import annotations

import math

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import optim
from distsvi.distributions import constraints
from distsvi.infer import SVI, Trace_ELBO

X0 = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5]), "s": torch.tensor(2.0)}


def model(use=("a", "b", "s")):
    for name in ("a", "b", "s"):
        if name in use:
            shape = X0[name].shape
            pyro.sample(name, dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape)))


def guide(use=("a", "b", "s"), order=("a", "b", "s")):
    for name in order:
        if name in use:
            value = pyro.param(f"{name}_map", X0[name].clone())
            pyro.sample(name, dist.Delta(value, event_dim=value.dim()))


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _by_hand(make_optim, steps, make_sched=None, sched_step=None):
    """The same trajectory with torch only: grad of 0.5*x**2 is x."""
    ps = {f"{k}_map": v.clone().requires_grad_(True) for k, v in X0.items()}
    opt = make_optim(list(ps.values()))
    sched = make_sched(opt) if make_sched else None
    log_norm = 0.5 * sum(v.numel() for v in X0.values()) * math.log(2 * math.pi)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(0.5 * (p**2).sum() for p in ps.values())
        loss.backward()
        opt.step()
        if sched is not None:
            sched_step(sched, loss.item() + log_norm)
    return {k: v.detach() for k, v in ps.items()}


def _run(o, steps, after=None):
    svi = SVI(model, guide, o, Trace_ELBO())
    losses = []
    for i in range(steps):
        losses.append(svi.step())
        if after is not None:
            after(o, i, losses[-1])
    return losses


def _assert_params(want):
    got = _params()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name,args,torch_cls",
    [
        ("Adam", {"lr": 0.1}, torch.optim.Adam),
        ("SGD", {"lr": 0.1, "momentum": 0.5}, torch.optim.SGD),
        ("AdamW", {"lr": 0.1, "weight_decay": 0.1}, torch.optim.AdamW),
        ("RMSprop", {"lr": 0.01}, torch.optim.RMSprop),
        ("Adagrad", {"lr": 0.3}, torch.optim.Adagrad),
    ],
)
def test_optimizer_matches_torch(name, args, torch_cls):
    _run(getattr(optim, name)(dict(args)), 5)
    _assert_params(_by_hand(lambda ps: torch_cls(ps, **args), 5))


def test_svi_step_returns_float_and_clears_grads():
    svi = SVI(model, guide, optim.Adam({"lr": 0.1}), Trace_ELBO())
    loss = svi.step()
    assert isinstance(loss, float)
    for _, p in pyro.get_param_store().named_parameters():
        assert p.grad is None or not p.grad.any()
    want = sum(
        0.5 * (v**2).sum() + 0.5 * v.numel() * torch.log(torch.tensor(2 * torch.pi))
        for v in X0.values()
    )
    assert loss == pytest.approx(want.item(), rel=1e-6)
    assert svi.evaluate_loss() == pytest.approx(svi.step(), rel=1e-6)


def test_evaluate_loss_does_not_step_or_build_graph():
    svi = SVI(model, guide, optim.Adam({"lr": 0.1}), Trace_ELBO())
    before = svi.evaluate_loss()
    after = svi.evaluate_loss()
    assert before == after
    for _, p in pyro.get_param_store().named_parameters():
        assert p.grad is None or not p.grad.any()


def test_per_param_callable():
    lrs = {"a_map": 0.5, "b_map": 0.05, "s_map": 0.0}
    seen = []

    def args(name):
        seen.append(name)
        return {"lr": lrs[name]}

    _run(optim.Adam(args), 4)
    assert sorted(set(seen)) == sorted(lrs)
    want = {}
    for name, lr in lrs.items():
        p = X0[name[0]].clone().requires_grad_(True)
        if lr > 0:
            o = torch.optim.Adam([p], lr=lr)
            for _ in range(4):
                o.zero_grad()
                (0.5 * (p**2).sum()).backward()
                o.step()
        want[name] = p.detach()
    _assert_params(want)


def test_only_touched_params_are_updated():
    """A param missing from a step keeps its value (no momentum step on stale state)."""
    o = optim.Adam({"lr": 0.1})
    svi = SVI(model, guide, o, Trace_ELBO())
    svi.step()
    b_after_one = pyro.param("b_map").detach().clone()
    for _ in range(3):
        svi.step(use=("a", "s"))
    assert torch.equal(pyro.param("b_map").detach(), b_after_one)


def test_state_is_keyed_by_param_name():
    o = optim.Adam({"lr": 0.1})
    _run(o, 2)
    state = o.get_state()
    assert set(state) == {"a_map", "b_map", "s_map"}


def test_save_load_into_store_built_in_another_order_resumes_exactly(tmp_path):
    o = optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})
    _run(o, 6)
    uninterrupted = _params()

    pyro.clear_param_store()
    o1 = optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})
    _run(o1, 3)
    o1.save(str(tmp_path / "optim.pt"))
    pyro.get_param_store().save(str(tmp_path / "params.pt"))
    saved = _params()

    pyro.clear_param_store()
    for name in reversed(list(saved)):  # created in another order than the first time
        pyro.param(name, saved[name].clone())
    o2 = optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)})
    o2.load(str(tmp_path / "optim.pt"))
    svi = SVI(model, lambda: guide(order=("s", "b", "a")), o2, Trace_ELBO())
    for _ in range(3):
        svi.step()
    _assert_params(uninterrupted)


def test_set_state_before_params_exist_resumes_exactly(tmp_path):
    o = optim.Adam({"lr": 0.1})
    _run(o, 5)
    uninterrupted = _params()

    pyro.clear_param_store()
    o1 = optim.Adam({"lr": 0.1})
    _run(o1, 2)
    state = o1.get_state()
    pyro.get_param_store().save(str(tmp_path / "params.pt"))
    pyro.clear_param_store()
    pyro.get_param_store().load(str(tmp_path / "params.pt"))
    o2 = optim.Adam({"lr": 0.1})
    o2.set_state(state)  # consumed lazily, when each param is first stepped
    _run(o2, 3)
    _assert_params(uninterrupted)


def test_clipped_adam_clips_elementwise_and_decays_lr():
    """Pyro's ClippedAdam: grad clamped to [-clip_norm, clip_norm]; lr *= lrd every step."""
    o = optim.ClippedAdam({"lr": 0.1, "clip_norm": 0.25, "lrd": 0.5, "betas": (0.0, 0.0)})
    _run(o, 3)
    # with betas 0, an Adam step is lr * g / (|g| + eps): a signed step of the decayed lr
    for name, x0 in X0.items():
        shift = sum(0.1 * 0.5**k for k in (1, 2, 3))
        want = x0 - shift * torch.sign(x0)
        torch.testing.assert_close(pyro.param(f"{name}_map").detach(), want)


def _sched_case(name):
    return {
        "ExponentialLR": (
            {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "gamma": 0.5},
            lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5),
        ),
        "StepLR": (
            {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "step_size": 2, "gamma": 0.1},
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1),
        ),
        "OneCycleLR": (
            {
                "optimizer": torch.optim.SGD,
                "optim_args": {"lr": 0.1},
                "max_lr": 0.3,
                "total_steps": 8,
            },
            lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=8),
        ),
        "ReduceLROnPlateau": (
            {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.6}, "factor": 0.5, "patience": 0},
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
        ),
    }[name]


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_scheduler_matches_torch(name):
    args, make_sched = _sched_case(name)
    plateau = name == "ReduceLROnPlateau"

    def step(sched, loss):
        sched.step(loss) if plateau else sched.step()

    _run(getattr(optim, name)(dict(args)), 7, lambda o, i, loss: step(o, loss))  # Pyro pops keys
    want = _by_hand(lambda ps: torch.optim.SGD(ps, **args["optim_args"]), 7, make_sched, step)
    _assert_params(want)


def test_generic_scheduler_wrapper():
    s = optim.PyroLRScheduler(
        torch.optim.lr_scheduler.MultiStepLR,
        {
            "optimizer": torch.optim.SGD,
            "optim_args": {"lr": 0.2},
            "milestones": [1, 3],
            "gamma": 0.5,
        },
    )
    _run(s, 5, lambda o, i, loss: o.step())
    want = _by_hand(
        lambda ps: torch.optim.SGD(ps, lr=0.2),
        5,
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.5),
        lambda sched, loss: sched.step(),
    )
    _assert_params(want)


def test_every_torch_scheduler_has_a_pyro_named_wrapper():
    for name in ("ExponentialLR", "StepLR", "OneCycleLR", "ReduceLROnPlateau", "CosineAnnealingLR",
                 "LambdaLR", "MultiStepLR", "CyclicLR"):  # fmt: skip
        assert callable(getattr(optim, name)), name


def test_scheduler_state_round_trip(tmp_path):
    args = lambda: {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1}, "gamma": 0.5}
    s = optim.ExponentialLR(args())
    _run(s, 6, lambda o, i, loss: o.step())
    uninterrupted = _params()

    pyro.clear_param_store()
    s1 = optim.ExponentialLR(args())
    _run(s1, 3, lambda o, i, loss: o.step())
    s1.save(str(tmp_path / "sched.pt"))
    s2 = optim.ExponentialLR(args())
    s2.load(str(tmp_path / "sched.pt"))
    _run(s2, 3, lambda o, i, loss: o.step())
    _assert_params(uninterrupted)


def test_constrained_param_is_optimised_unconstrained():
    def m():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))
        sd = pyro.param("sd", torch.tensor(2.0), constraint=constraints.positive)
        pyro.sample("z", dist.Normal(0.0, sd), obs=torch.tensor(1.0))

    SVI(m, lambda: None, optim.SGD({"lr": 0.1}), Trace_ELBO()).step()
    # loss = log sd + 1/(2 sd^2); d/du at u = log 2: 1 - 1/sd^2 = 0.75
    u = torch.log(torch.tensor(2.0)) - 0.1 * 0.75
    assert pyro.param("sd").item() == pytest.approx(u.exp().item(), rel=1e-6)


def _torch_optimizer(opt):
    (cohort,) = opt._cohorts
    return cohort.optimizer


@pytest.mark.parametrize("args", [{}, {"foreach": False}, {"fused": False}])
def test_optimizers_take_torchs_fused_kernels_unless_told_and_save_pyros_options(args):
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        pytest.skip("this torch has no fused Adam for CPU")
    opt = optim.Adam({"lr": 0.1, **args})
    svi = SVI(model, guide, opt, Trace_ELBO())
    svi.step()
    group = _torch_optimizer(opt).param_groups[0]
    assert bool(group["fused"]) == (args == {})
    state = opt.get_state()
    assert all(e["param_groups"][0]["fused"] is None for e in state.values())
    assert all(e["param_groups"][0]["foreach"] is None for e in state.values())
    # a loaded state does not choose the kernels: this process's choice stays
    pyro.clear_param_store()
    opt2 = optim.Adam({"lr": 0.1, **args})
    svi2 = SVI(model, guide, opt2, Trace_ELBO())
    svi2.step()
    opt2.set_state(state)
    assert bool(_torch_optimizer(opt2).param_groups[0]["fused"]) == (args == {})


def test_fused_and_default_kernels_take_the_same_steps():
    finals = []
    for args in ({}, {"fused": False, "foreach": False}):
        pyro.clear_param_store()
        opt = optim.Adam({"lr": 0.1, **args})
        svi = SVI(model, guide, opt, Trace_ELBO())
        for _ in range(20):
            svi.step()
        finals.append({n: p.detach().clone() for n, p in pyro.get_param_store().items()})
    for name, value in finals[1].items():
        torch.testing.assert_close(finals[0][name], value, rtol=1e-6, atol=1e-7)


def test_sgd_keeps_its_default_kernels_which_take_sparse_gradients():
    opt = optim.SGD({"lr": 0.1})
    SVI(model, guide, opt, Trace_ELBO()).step()
    group = _torch_optimizer(opt).param_groups[0]
    assert not group["fused"] and group["foreach"]

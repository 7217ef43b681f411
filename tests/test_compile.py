"""SVI(compile=True): the compiled step takes the same steps as the eager one."""

import os
import subprocess
import sys

import pytest
import torch
from torch.distributions import constraints

import distsvi as pyro
import distsvi.distributions as dist
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam


def model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(x), subsample_size=16) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


def guide(x, y):
    loc = pyro.param("loc", torch.zeros(3))
    scale = pyro.param("scale", torch.full((3,), 0.5), constraint=constraints.positive)
    pyro.sample("w", dist.Normal(loc, scale).to_event(1))


def run(compile_: bool, steps: int = 15, kernels: dict | None = None):
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -2.0, 0.5])), generator=g)
    torch.manual_seed(0)
    optim = Adam({"lr": 0.05, **(kernels or {})})
    svi = SVI(model, guide, optim, Trace_ELBO(), compile=compile_)
    losses = [svi.step(x, y) for _ in range(steps)]
    groups = optim.optimizer.param_groups
    kernels_used = {(g["fused"], g["foreach"]) for g in groups}
    return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, kernels_used


@pytest.mark.timeout(600)
def test_compiled_step_matches_eager():
    eager_losses, eager_params, eager_kernels = run(False)
    compiled_losses, compiled_params, compiled_kernels = run(True)
    # eager steps take torch's fused Adam; the compiled optimizer step is compiled foreach
    assert eager_kernels == {(True, None)} and compiled_kernels == {(None, True)}
    torch.testing.assert_close(
        torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-4
    )
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(600)
def test_a_kernel_the_user_chose_is_compiled_as_chosen():
    _, eager_params, _ = run(False, steps=5, kernels={"fused": True})
    _, params, kernels = run(True, steps=5, kernels={"fused": True})
    assert kernels == {(True, None)}  # the fused step runs as it is, not compiled
    for name, value in eager_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)


def run_with_a_late_param(compile_: bool, steps: int = 5) -> dict:
    pyro.clear_param_store()
    calls = []

    def late_guide():
        calls.append(None)
        loc = pyro.param("loc", torch.tensor(0.0))
        if len(calls) >= 3:  # born on a step that runs compiled
            loc = loc + pyro.param("shift", torch.tensor(0.5))
        pyro.sample("z", dist.Normal(loc, 1.0))

    torch.manual_seed(0)
    svi = SVI(
        lambda: pyro.sample("z", dist.Normal(0.0, 1.0)),
        late_guide,
        Adam({"lr": 0.1}),
        Trace_ELBO(),
        compile=compile_,
    )
    for _ in range(steps):
        svi.step()
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.timeout(600)
def test_a_param_born_in_a_compiled_step_steps_at_once_as_in_eager():
    eager, compiled = run_with_a_late_param(False), run_with_a_late_param(True)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=1e-6)


def test_compile_needs_an_elbo():
    with pytest.raises(ValueError, match="compile=True"):
        SVI(model, guide, Adam({"lr": 0.1}), lambda m, g, *a: torch.tensor(0.0), compile=True)


@pytest.mark.timeout(600)
def test_an_autoguide_elbo_with_full_plates_compiles_to_one_graph():
    from distsvi.infer.autoguide import AutoNormal

    def hier(group, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        with pyro.plate("groups", 4):  # full-size plates: their index tensors are reused
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(theta[group], 1.0), obs=y)

    pyro.clear_param_store()
    group = torch.arange(4).repeat_interleave(3)
    y = torch.randn(12)
    guide, elbo = AutoNormal(hier), Trace_ELBO()
    SVI(hier, guide, Adam({"lr": 0.01}), elbo).step(group, y)
    torch._dynamo.reset()
    with pyro.validation_enabled(False):
        ex = torch._dynamo.explain(lambda *a: elbo.differentiable_loss(hier, guide, *a))(group, y)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    pyro.clear_param_store()


def test_compiling_leaves_torchs_argument_checks_as_they_were():
    # torch.compile's first use in a process turns them off globally: a fresh process
    script = (
        "import torch, test_compile as t\n"
        "t.run(True, steps=3)\n"
        "assert torch.distributions.Distribution._validate_args, 'checks left off'\n"
        "try:\n"
        "    torch.distributions.Normal(0.0, -1.0)\n"
        "except ValueError:\n"
        "    print('checked')\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tests,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("checked")

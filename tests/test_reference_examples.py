"""The two usage examples of Pyro's SVI reference page, run with only their imports changed.

Each example's source is executed twice, once under Pyro's imports and once under distsvi's,
from the same seed; the final losses (mean of the last 50 steps) must agree within 2%.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

pytest.importorskip("pyro")

IMPORTS = {
    "pyro": """
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, Trace_ELBO
        from pyro.optim import Adam, ClippedAdam
    """,
    "distsvi": """
        import distsvi as pyro
        import distsvi.distributions as dist
        from distsvi.infer import SVI, Trace_ELBO
        from distsvi.optim import Adam, ClippedAdam
    """,
}

MODEL = """
    import torch
    from torch.distributions import constraints

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        log_scale = pyro.sample("log_scale", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, log_scale.exp()), obs=data)

    def guide(data):
        q_loc = pyro.param("q_loc", torch.tensor(2.0))
        q_scale = pyro.param("q_scale", torch.tensor(0.3), constraint=constraints.positive)
        s_loc = pyro.param("s_loc", torch.tensor(0.3))
        s_scale = pyro.param("s_scale", torch.tensor(0.2), constraint=constraints.positive)
        pyro.sample("loc", dist.Normal(q_loc, q_scale))
        pyro.sample("log_scale", dist.Normal(s_loc, s_scale))
"""

# Example 1 of the page ("Basic SVI Training Loop"), with the losses kept.
BASIC = """
    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for step in range(1000):
        loss = svi.step(data)
        losses.append(loss)
        if step % 100 == 0:
            print(f"Step {step} : loss = {loss:.4f}")
"""

# Example 2 of the page ("Training with Validation Monitoring"), with the losses kept.
VALIDATION = """
    pyro.clear_param_store()
    svi = SVI(model, guide, ClippedAdam({"lr": 0.005}), Trace_ELBO())
    for step in range(2000):
        train_loss = svi.step(train_data)
        losses.append(train_loss)
        if step % 100 == 0:
            val_loss = svi.evaluate_loss(val_data)
            val_losses.append(val_loss)
            print(f"Step {step} : train loss = {train_loss:.4f}, val loss = {val_loss:.4f}")
"""

_g = torch.Generator().manual_seed(7)
DATA = 3.0 + 2.0 * torch.randn(200, generator=_g)
TRAIN_DATA, VAL_DATA = DATA[:150], DATA[150:]


def run_example(engine: str, body: str) -> dict:
    source = "\n".join(textwrap.dedent(s) for s in (IMPORTS[engine], MODEL, body))
    namespace = {
        "data": DATA,
        "train_data": TRAIN_DATA,
        "val_data": VAL_DATA,
        "losses": [],
        "val_losses": [],
    }
    torch.manual_seed(0)
    exec(compile(source, f"<{engine} example>", "exec"), namespace)  # noqa: S102
    return namespace


def _tail_mean(xs, n=50):
    return sum(xs[-n:]) / n


def test_basic_training_loop():
    want = run_example("pyro", BASIC)
    got = run_example("distsvi", BASIC)
    assert len(got["losses"]) == 1000
    assert all(isinstance(x, float) for x in got["losses"])
    assert _tail_mean(got["losses"]) == pytest.approx(_tail_mean(want["losses"]), rel=0.02)
    # training did something: the loss fell from its start
    assert _tail_mean(got["losses"]) < sum(got["losses"][:50]) / 50 - 10.0


def test_training_with_validation_monitoring():
    want = run_example("pyro", VALIDATION)
    got = run_example("distsvi", VALIDATION)
    assert len(got["losses"]) == 2000 and len(got["val_losses"]) == 20
    assert all(isinstance(x, float) for x in got["val_losses"])
    assert _tail_mean(got["losses"]) == pytest.approx(_tail_mean(want["losses"]), rel=0.02)
    assert _tail_mean(got["val_losses"], 5) == pytest.approx(
        _tail_mean(want["val_losses"], 5), rel=0.02
    )

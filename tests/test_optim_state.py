"""Optimizer state: the layout get_state() writes (Pyro's), and states saved in the layout
distsvi wrote before (files in tests/data/, written by that version) still resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import optim
from distsvi.infer import SVI, Trace_ELBO

DATA_DIR = Path(__file__).parent / "data"
X = torch.linspace(-1.0, 3.0, 8)


def model(late: bool) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    shift = pyro.param("shift", torch.tensor(0.5)) if late else 0.0
    with pyro.plate("data", len(X)):
        pyro.sample("obs", dist.Normal(loc + shift, 1.0), obs=X)


def guide(late: bool) -> None:
    pyro.sample("loc", dist.Delta(pyro.param("loc_map", torch.tensor(-2.0))))
    pyro.param("unused_scale", torch.tensor(1.0), constraint=dist.constraints.positive)


OPTIMS = {
    "Adam": (lambda: optim.Adam({"lr": 0.1, "betas": (0.8, 0.9)}), False),
    "ClippedAdam": (lambda: optim.ClippedAdam({"lr": 0.2, "lrd": 0.8, "clip_norm": 1.0}), False),
    "StepLR": (
        lambda: optim.StepLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "step_size": 2, "gamma": 0.5}
        ),
        True,
    ),
}


def run(o, first: int, steps: int, scheduled: bool) -> list[float]:
    """Steps ``first .. first+steps-1``; param ``shift`` joins at step 3."""
    svi = SVI(model, guide, o, Trace_ELBO())
    losses = []
    for i in range(first, first + steps):
        losses.append(svi.step(i >= 3))
        if scheduled:
            o.step()
    return losses


def _params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.parametrize("name", list(OPTIMS))
def test_state_saved_in_the_earlier_layout_resumes(name):
    """The files hold the param store and optimizer state after 5 steps, as the earlier
    version saved them; 4 more steps from them equal 9 uninterrupted ones."""
    make, scheduled = OPTIMS[name]
    pyro.clear_param_store()
    want_losses = run(make(), 0, 9, scheduled)
    want = _params()

    pyro.clear_param_store()
    pyro.get_param_store().load(str(DATA_DIR / f"optim_v0_{name}_params.pt"))
    o = make()
    o.load(str(DATA_DIR / f"optim_v0_{name}_optim.pt"))
    losses = run(o, 5, 4, scheduled)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses[5:]))
    for k, v in want.items():
        torch.testing.assert_close(_params()[k], v, msg=f"{name}: {k}")
    # and saved again, now in Pyro's layout, it resumes the same way
    assert all("param_groups" in (e.get("optimizer", e)) for e in o.get_state().values())


def test_get_state_is_keyed_by_name_in_torch_state_dict_form():
    pyro.clear_param_store()
    o = optim.Adam({"lr": 0.1})
    run(o, 0, 4, False)
    state = o.get_state()
    assert set(state) == {"loc_map", "shift", "unused_scale"}
    entry = state["loc_map"]
    assert set(entry) == {"state", "param_groups"}
    assert set(entry["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert entry["param_groups"][0]["params"] == [0]
    assert entry["param_groups"][0]["lr"] == 0.1
    assert state["unused_scale"]["state"] == {}  # never had a gradient


def test_set_state_names_a_malformed_entry():
    o = optim.Adam({"lr": 0.1})
    with pytest.raises(ValueError, match=r"param 'loc_map' has keys \['lr'\].*state_dict"):
        o.set_state({"loc_map": {"lr": 0.1}})
    with pytest.raises(TypeError, match="param 'loc_map' is float, not a dict"):
        o.set_state({"loc_map": 0.1})


def test_clipped_adam_saves_pyros_decayed_lr_and_restores_its_own():
    pyro.clear_param_store()
    o = optim.ClippedAdam({"lr": 0.2, "lrd": 0.5})
    run(o, 0, 3, False)
    saved = o.get_state()["loc_map"]["param_groups"][0]["lr"]
    assert saved == pytest.approx(0.2 * 0.5**3)  # Pyro's optimizer holds lr * lrd**steps
    assert o.optimizer.param_groups[0]["lr"] == 0.2  # the shared group keeps the given lr
    o.set_state(o.get_state())
    assert o.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_without_hyperparameters_keeps_moments_and_drops_options():
    pyro.clear_param_store()
    o = optim.Adam({"lr": 0.1})
    run(o, 0, 2, False)
    state = optim.optim.without_hyperparameters(o.get_state())
    assert state["loc_map"]["param_groups"] == [{"params": [0]}]
    o2 = optim.Adam({"lr": 0.01})
    run(o2, 0, 1, False)
    o2.set_state(state)
    assert o2.optimizer.param_groups[0]["lr"] == 0.01
    assert int(o2.optimizer.state[pyro.param("loc_map").unconstrained()]["step"]) == 2


def test_lazy_rows_run_the_per_param_clipped_adam_only():
    """Lazy row updates know the wrapper's ClippedAdam (lr * lrd**k per row); Pyro's torch
    class decays its groups' lr in place instead, which a row update cannot follow."""
    from distsvi.optim.clipped_adam import ClippedAdam

    assert optim.ClippedAdam({"lr": 0.1}, local_updates="lazy").local_updates == "lazy"
    with pytest.raises(ValueError, match="local_updates='lazy' is not available for ClippedAdam"):
        optim.PyroOptim(ClippedAdam, {"lr": 0.1}, local_updates="lazy")

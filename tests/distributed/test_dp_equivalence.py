"""Invariants 1 and 2: each rank's loss is unbiased, and W ranks take exactly the step one
process takes on the union of their subsamples (2 real Gloo ranks)."""

from __future__ import annotations

import math

import dp_models as m
import dp_workers as w
import pytest
import torch
from dp_harness import assert_same, ok, run_ranks

import distsvi as pyro
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("name", ["logistic", "hierarchical"])
def test_two_ranks_step_as_one_process_on_the_union(name, float64, backend):
    steps, batch = 20, 16
    r0, r1 = ok(run_ranks(w.equivalence, name, steps, batch, dtype=torch.float64, backend=backend))
    assert_same(r0["params"], r1["params"])

    make, model = w.MODELS[name]
    x, y = make()
    svi = SVI(model, w.auto_delta(model), Adam({"lr": 0.05}), Trace_ELBO())
    for i0, i1 in zip(r0["indices"], r1["indices"]):
        assert len(i0) == len(i1) == batch
        assert not set(i0.tolist()) & set(i1.tolist()), "ranks drew overlapping indices"
        svi.step(x, y, idx=torch.cat([i0, i1]))  # plate scale N / (W * B)
    reference = w.snapshot()
    assert reference.keys() == r0["params"].keys()
    for n, v in reference.items():
        torch.testing.assert_close(r0["params"][n], v, rtol=1e-6, atol=1e-6, msg=n)
        assert not torch.equal(v, torch.zeros_like(v)), f"{n} never moved"


def test_two_rank_loss_is_unbiased_for_the_full_data_loss(float64, backend):
    steps = 200
    r0, r1 = ok(
        run_ranks(w.losses_at_fixed_params, steps, 16, dtype=torch.float64, backend=backend)
    )
    assert r0 == r1, "ranks must report the same averaged loss"
    x, y = m.make_logistic()
    pyro.clear_param_store()
    full = Trace_ELBO().loss(m.logistic_model, m.logistic_delta_guide, x, y)
    losses = torch.tensor(r0)
    mean, se = losses.mean().item(), losses.std().item() / math.sqrt(steps)
    assert se > 0
    assert abs(mean - full) < 3 * se, (mean, full, se)

"""Data paths and validation on 2 real Gloo ranks: DataLoader + DistributedSampler vs
in-memory subsample plates, and the full validation loss (invariant 7)."""

from __future__ import annotations

import dp_models as m
import dp_workers as w
import pytest
import torch
from dp_harness import ok, run_ranks

import distsvi as pyro
from distsvi.infer import Trace_ELBO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def test_dataloader_path_and_plate_path_reach_the_same_elbo(backend):
    r0, r1 = ok(run_ranks(w.loader_vs_plate, 150, 32, backend=backend))
    assert r0 == r1
    assert abs(r0["loader"] - r0["plate"]) < 0.01 * abs(r0["plate"]), r0


def test_evaluate_loss_is_the_full_validation_loss(float64, backend):
    r0, r1 = ok(run_ranks(w.validation, dtype=torch.float64, backend=backend))
    assert r0["subsampled"] == r1["subsampled"] and r0["whole"] == r1["whole"]
    pyro.get_param_store().set_state(r0["state"])
    x_val, y_val = m.make_logistic(n=301, seed=9)
    full = Trace_ELBO().loss(m.logistic_model, m.logistic_delta_guide, x_val, y_val)
    assert r0["subsampled"] == pytest.approx(full, rel=1e-5)
    assert r0["whole"] == pytest.approx(full, rel=1e-5)


def test_evaluate_loss_with_an_autoguide_and_local_latents(float64, backend):
    r0, r1 = ok(run_ranks(w.validation_autoguide, dtype=torch.float64, backend=backend))
    assert r0["loss"] == r1["loss"]
    pyro.get_param_store().set_state(r0["state"])
    x, y = m.make_hierarchical(n=301)
    full = Trace_ELBO().loss(m.hierarchical_model, w.auto_delta(m.hierarchical_model), x, y)
    assert r0["loss"] == pytest.approx(full, rel=1e-5)

"""Local params (one row per datapoint, read in a subsampled plate): row-sparse reads and
the two ways of updating them, ``local_updates="dense"`` (Pyro's numbers) and ``"lazy"``
(only the batch's rows step)."""

from __future__ import annotations

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import optim
from distsvi.infer import SVI, Trace_ELBO
from distsvi.infer.autoguide import AutoDelta, AutoNormal
from distsvi.params import rows as rows_mod

N, B, D = 12, 4, 3
DATA = torch.linspace(-2.0, 3.0, N * D).reshape(N, D)


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def local_model(data):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 3.0).to_event(1))
    with pyro.plate("data", N, subsample_size=B) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=data[idx])


def param_guide(data):
    """A hand-written guide whose locals are ``param(..., event_dim=1)`` in the plate."""
    m = pyro.param("m", torch.zeros(D))
    pyro.sample("mu", dist.Delta(m).to_event(1))
    with pyro.plate("data", N, subsample_size=B):
        loc = pyro.param("loc", torch.zeros(N, D), event_dim=1)
        scale = pyro.param(
            "scale", torch.ones(N, D), constraint=dist.constraints.positive, event_dim=1
        )
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def run(guide_fn, optimizer, steps, seed=0):
    torch.manual_seed(seed)
    guide = guide_fn(local_model) if isinstance(guide_fn, type) else guide_fn
    svi = SVI(local_model, guide, optimizer, Trace_ELBO())
    batches = []
    for _ in range(steps):
        svi.step(DATA)
    store = pyro.get_param_store()
    return {k: v.detach().clone() for k, v in store.named_parameters()}, batches


def test_row_read_is_its_own_leaf_and_forward_takes_only_the_rows():
    """During a step the full tensor gets no gradient: only a B-row leaf does."""
    seen = {}

    def guide(data):
        with pyro.plate("data", N, subsample_size=B) as idx:
            loc = pyro.param("loc", torch.zeros(N, D), event_dim=1)
            seen["shape"], seen["idx"] = loc.shape, idx
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
        pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def model(data):
        pyro.sample("mu", dist.Normal(torch.zeros(D), 3.0).to_event(1))
        with pyro.plate("data", N, subsample_size=B):
            pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    elbo = Trace_ELBO()
    pyro.param("loc", torch.zeros(N, D))
    full = pyro.get_param_store()._params["loc"]
    with rows_mod.record_rows() as record:
        elbo.loss_and_grads(model, guide, DATA)
    assert seen["shape"] == (B, D)
    assert full.grad is None
    (leaf,) = [v for v in record.values() if isinstance(v, rows_mod.RowLeaf)]
    assert leaf.rows.shape == (B, D) and leaf.rows.grad is not None
    assert torch.equal(leaf.index, seen["idx"])


def test_reads_outside_a_step_are_whole():
    pyro.param("loc", torch.arange(float(N * D)).reshape(N, D))
    with pyro.plate("data", N, subsample_size=B) as idx:
        loc = pyro.param("loc", event_dim=1)
    assert loc.shape == (B, D)
    assert torch.equal(loc, pyro.param("loc").index_select(0, idx))
    assert loc.requires_grad and loc.grad_fn is not None  # a view of the full param


@pytest.mark.parametrize("guide", [AutoNormal, AutoDelta, param_guide])
def test_dense_equals_the_step_without_row_reads(guide, monkeypatch):
    """Scattering the row gradient into a full gradient gives exactly today's dense step."""
    want, _ = (None, None)
    got, _ = run(guide, optim.Adam({"lr": 0.05}), 8)
    pyro.clear_param_store()
    monkeypatch.setattr(rows_mod, "is_recording", lambda: False)
    want, _ = run(guide, optim.Adam({"lr": 0.05}), 8)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield DATA.double()
    torch.set_default_dtype(old)


def test_lazy_adam_is_one_adam_per_row_stepped_when_visited(float64):
    """Lazy Adam on AutoDelta's local rows == a torch.optim.Adam per row, stepped only at
    the steps whose batch holds the row, fed that row's gradient."""
    steps, lr = 15, 0.05
    torch.manual_seed(0)
    guide = AutoDelta(local_model)
    svi = SVI(local_model, guide, optim.Adam({"lr": lr}, local_updates="lazy"), Trace_ELBO())
    data = float64
    svi.step(data)  # creates the params
    store = pyro.get_param_store()
    z = store._params["AutoDelta.z"]
    # the reference: a copy of every row, its own Adam, and the row gradients of each step
    ref_rows = [z[i].detach().clone().requires_grad_(True) for i in range(N)]
    ref_opt = [torch.optim.Adam([r], lr=lr) for r in ref_rows]
    # replay step 1 for the reference from the first step's state: every visited row has
    # taken one step, so start the reference after it from the same values and state
    state = svi.optim._cohort_of["AutoDelta.z"].optimizer.state[z]
    visited = state["step"] > 0
    for i in range(N):
        if visited[i]:
            ref_opt[i].state[ref_rows[i]] = {
                "step": torch.tensor(1.0),
                "exp_avg": state["exp_avg"][i].clone(),
                "exp_avg_sq": state["exp_avg_sq"][i].clone(),
            }
    grads = {}
    original = rows_mod.row_grads

    def spy(record):
        out = original(record)
        grads.update({k: (v.index.clone(), v.grad.clone()) for k, v in out.items()})
        return out

    rows_mod.row_grads = spy
    try:
        for _ in range(steps):
            before = z.detach().clone()
            svi.step(data)
            index, grad = grads["AutoDelta.z"]
            for j, i in enumerate(index.tolist()):
                ref_rows[i].grad = grad[j].clone()
                ref_opt[i].step()
            unvisited = [i for i in range(N) if i not in index.tolist()]
            assert torch.equal(z.detach()[unvisited], before[unvisited])
    finally:
        rows_mod.row_grads = original
    for i in range(N):
        torch.testing.assert_close(z.detach()[i], ref_rows[i].detach(), rtol=0, atol=1e-6)
    # and the per-row counts are the visits
    assert state["step"].sum() == B * (steps + 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda lazy: optim.SGD({"lr": 0.05}, local_updates=lazy),
        lambda lazy: optim.Adagrad({"lr": 0.1}, local_updates=lazy),
        lambda lazy: optim.Adagrad({"lr": 0.1, "weight_decay": 0.0}, {"clip_norm": 0.5}, lazy),
    ],
)
@pytest.mark.parametrize("guide", [AutoNormal, AutoDelta, param_guide])
def test_lazy_sgd_and_adagrad_equal_dense(make, guide):
    dense, _ = run(guide, make("dense"), 12)
    pyro.clear_param_store()
    lazy, _ = run(guide, make("lazy"), 12)
    for k in dense:
        torch.testing.assert_close(lazy[k], dense[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.Adam({"lr": 0.05, "weight_decay": 0.01}, local_updates="lazy"),
        lambda: optim.AdamW({"lr": 0.05, "amsgrad": True}, local_updates="lazy"),
        lambda: optim.SGD({"lr": 0.05, "momentum": 0.9, "nesterov": True}, local_updates="lazy"),
        lambda: optim.RMSprop(
            {"lr": 0.01, "centered": True, "momentum": 0.5}, local_updates="lazy"
        ),
        lambda: optim.Adadelta({"lr": 1.0}, local_updates="lazy"),
        lambda: optim.AdagradRMSProp({"eta": 0.5}, local_updates="lazy"),
        lambda: optim.ClippedAdam(
            {"lr": 0.05, "lrd": 0.99, "clip_norm": 1.0}, local_updates="lazy"
        ),
    ],
)
def test_lazy_rows_of_every_row_are_the_dense_step(make, float64):
    """Row updates that visit every row (in shuffled order) are torch's own optimizer's
    steps: checks each family's row function against torch's implementation."""
    torch.manual_seed(1)
    start = torch.randn(N, D)
    grads = [torch.randn(N, D) for _ in range(6)]
    lazy = make()
    full = start.clone().requires_grad_(True)
    for g in grads:
        perm = torch.randperm(N)
        lazy({}, rows=[rows_mod.RowGrad("p", full, 0, perm, g[perm].clone())])
    dense = make()
    dense.local_updates = "dense"
    ref = start.clone().requires_grad_(True)
    for g in grads:
        ref.grad = g.clone()
        dense({"p": ref})
    torch.testing.assert_close(full.detach(), ref.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(full.detach(), start)


def test_lazy_follows_a_scheduler_and_per_param_options():
    sched = optim.StepLR(
        {
            "optimizer": torch.optim.SGD,
            "optim_args": lambda name: {"lr": 0.1},
            "step_size": 1,
            "gamma": 0.5,
        },
        local_updates="lazy",
    )
    torch.manual_seed(0)
    svi = SVI(local_model, param_guide, sched, Trace_ELBO())
    svi.step(DATA)
    sched.step()
    assert sched.optimizer.param_groups[0]["lr"] == 0.05
    loc = pyro.get_param_store()._params["loc"]
    before = loc.detach().clone()
    grads = {}
    original = rows_mod.row_grads

    def spy(record):
        out = original(record)
        grads.update({k: (v.index.clone(), v.grad.clone()) for k, v in out.items()})
        return out

    rows_mod.row_grads = spy
    try:
        svi.step(DATA)
    finally:
        rows_mod.row_grads = original
    index, grad = grads["loc"]
    torch.testing.assert_close(loc.detach()[index], before[index] - 0.05 * grad)


def test_lazy_state_round_trips_through_get_state():
    opt = optim.Adam({"lr": 0.05}, local_updates="lazy")
    run(AutoNormal, opt, 3)
    state = opt.get_state()
    steps = state["AutoNormal.locs.z"]["state"][0]["step"]
    assert steps.shape == (N,) and steps.sum() == 3 * B
    opt2 = optim.Adam({"lr": 0.05}, local_updates="lazy")
    opt2.set_state(state)
    assert opt2._pending["AutoNormal.locs.z"]["state"][0]["step"].shape == (N,)


def test_bad_local_updates_is_a_clear_error():
    with pytest.raises(ValueError, match="local_updates must be 'dense' or 'lazy'"):
        optim.Adam({"lr": 0.1}, local_updates="sparse")
    with pytest.raises(ValueError, match="not available for LBFGS"):
        optim.PyroOptim(torch.optim.LBFGS, {"lr": 0.1}, local_updates="lazy")


def _pyro_run(P, guide_name, steps):
    import importlib

    P.pyro.clear_param_store()
    torch.manual_seed(0)
    data = DATA.to(torch.get_default_dtype())

    def model(data):
        mu = P.pyro.sample("mu", P.dist.Normal(torch.zeros(D), 3.0).to_event(1))
        with P.pyro.plate("data", N, subsample_size=B) as idx:
            z = P.pyro.sample("z", P.dist.Normal(mu, 1.0).to_event(1))
            P.pyro.sample("x", P.dist.Normal(z, 0.5).to_event(1), obs=data[idx])

    guide = getattr(importlib.import_module(f"{P.name}.infer.autoguide"), guide_name)(model)
    svi = P.infer.SVI(model, guide, P.optim.Adam({"lr": 0.05}), P.infer.Trace_ELBO())
    losses = [svi.step(data) for _ in range(steps)]
    store = P.pyro.get_param_store()
    out = {k: store[k].detach().clone() for k in list(store)}
    P.pyro.clear_param_store()
    return losses, out


@pytest.mark.parametrize("guide_name", ["AutoDelta", "AutoNormal"])
def test_dense_matches_pyro_over_twenty_adam_steps(guide_name):
    pytest.importorskip("pyro")
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "parity"))
    from parity_harness import both

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        (want_losses, want), (got_losses, got) = (_pyro_run(P, guide_name, 20) for P in both())
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(got_losses, want_losses):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

"""Per-datapoint (local) params read as the batch's rows, and their optimizer updates:
``local_updates="dense"`` is Pyro's step exactly, ``"lazy"`` steps only the visited rows."""

from __future__ import annotations

import pytest
import torch

import distsvi as pyro
import distsvi.distributions as dist
from distsvi import constraints, optim, primitives
from distsvi.infer import SVI, Predictive, Trace_ELBO
from distsvi.infer.autoguide import AutoDelta, AutoNormal

N, B, D = 12, 4, 2
X = torch.linspace(-2.0, 3.0, N * D, dtype=torch.float64).reshape(N, D)
# Fixed batches, rows drawn unevenly (row 0 often, row 11 never).
BATCHES = [torch.tensor(b) for b in ([0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 7, 8], [9, 10, 0, 2])] * 5


def model(idx, x=X):
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Gamma(2.0 * torch.ones(D, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x.index_select(0, idx))


def guide(idx, x=X):
    with pyro.plate("data", N, subsample=idx):
        value = pyro.param(
            "z_value", torch.ones(N, D, dtype=x.dtype), constraints.positive, event_dim=1
        )
        pyro.sample("z", dist.Delta(value, event_dim=1))


def run(opt, guide_fn=guide, steps=len(BATCHES), model_fn=model):
    pyro.clear_param_store()
    torch.manual_seed(0)
    if isinstance(guide_fn, type):
        guide_fn = guide_fn(model_fn, create_plates=lambda idx, x=X: pyro.plate("data", N, subsample=idx))
    svi = SVI(model_fn, guide_fn, opt, Trace_ELBO())
    losses = [svi.step(BATCHES[i]) for i in range(steps)]
    store = pyro.get_param_store()
    return losses, {k: v.detach().clone() for k, v in store.items()}


def test_reads_only_the_batch_rows_and_never_a_whole_gradient():
    pyro.clear_param_store()
    guide(BATCHES[0])  # create it
    with primitives.record_row_reads() as reads, pyro.poutine.trace() as tr:
        guide(BATCHES[1])
    (read,) = reads
    assert read.rows.shape == (B, D) and read.dim == 0 and read.rows.is_leaf
    assert torch.equal(read.index, BATCHES[1])
    full = pyro.get_param_store()._params["z_value"]
    torch.testing.assert_close(tr.trace.nodes["z_value"]["value"], full.exp()[BATCHES[1]])
    tr.trace.nodes["z"]["value"].sum().backward()
    assert full.grad is None and read.rows.grad.shape == (B, D)
    # Outside a step, the param is read whole and indexed (as before).
    assert guide(BATCHES[1]) is None and pyro.param("z_value").shape == (N, D)


@pytest.mark.parametrize("make", [optim.Adam, optim.SGD, optim.Adagrad])
def test_dense_rows_equal_a_whole_read(make, monkeypatch):
    args = {"lr": 0.05}
    want = run(make(args))
    # The old path: no row reads at all, the param read whole and indexed in the plate.
    monkeypatch.setattr(primitives, "record_row_reads", lambda: _no_reads())
    import distsvi.infer.svi as svi_mod

    monkeypatch.setattr(svi_mod, "record_row_reads", lambda: _no_reads())
    got = run(make(args))
    assert want[0] == pytest.approx(got[0], abs=1e-9)
    torch.testing.assert_close(want[1]["z_value"], got[1]["z_value"], rtol=0, atol=1e-9)


class _no_reads:
    def __enter__(self):
        return []

    def __exit__(self, *exc):
        return False


def _per_row_reference(lr, steps=len(BATCHES)):
    """Each row its own torch.optim.Adam over its own unconstrained tensor, stepped only
    on the batches that hold the row, on the row's own term of the loss."""
    w = [torch.zeros(D, dtype=torch.float64, requires_grad=True) for _ in range(N)]
    opts = [torch.optim.Adam([wi], lr=lr) for wi in w]
    prior = torch.distributions.Gamma(2.0 * torch.ones(D, dtype=torch.float64), 1.0)
    for idx in BATCHES[:steps]:
        for i in idx.tolist():
            z = w[i].exp()
            term = -(N / B) * (prior.log_prob(z).sum() + torch.distributions.Normal(z, 1.0).log_prob(X[i]).sum())
            opts[i].zero_grad()
            term.backward()
            opts[i].step()
    return torch.stack([wi.detach().exp() for wi in w])


def test_lazy_adam_is_a_separate_adam_per_row():
    _, got = run(optim.Adam({"lr": 0.05}, local_updates="lazy"))
    want = _per_row_reference(0.05)
    torch.testing.assert_close(got["z_value"], want, rtol=0, atol=1e-6)
    assert torch.equal(got["z_value"][11], torch.ones(D, dtype=torch.float64))  # never visited


def test_dense_adam_moves_unvisited_rows_lazy_does_not():
    _, dense = run(optim.Adam({"lr": 0.05}), steps=2)
    _, lazy = run(optim.Adam({"lr": 0.05}, local_updates="lazy"), steps=2)
    # Row 1 is in batch 0 only: dense moves it again by momentum at step 2, lazy does not.
    _, one = run(optim.Adam({"lr": 0.05}, local_updates="lazy"), steps=1)
    assert torch.equal(lazy["z_value"][1], one["z_value"][1])
    assert not torch.allclose(dense["z_value"][1], one["z_value"][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make,args",
    [
        (optim.SGD, {"lr": 0.02}),
        (optim.SGD, {"lr": 0.02, "weight_decay": 0.1}),
        (optim.Adagrad, {"lr": 0.1}),
        (optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}),
    ],
)
@pytest.mark.parametrize("guide_cls", [None, AutoDelta])
def test_lazy_equals_dense_for_sgd_and_adagrad(make, args, guide_cls):
    if guide_cls is not None and "weight_decay" in args:
        pytest.skip("weight decay moves unvisited rows densely")
    g = guide if guide_cls is None else guide_cls
    _, dense = run(make(args), g)
    _, lazy = run(make(args, local_updates="lazy"), g)
    assert set(dense) == set(lazy)
    if "weight_decay" in args:  # decay moves every row in the dense step: lazy differs
        assert not torch.allclose(dense["z_value"], lazy["z_value"], atol=1e-6)
        return
    for k in dense:
        torch.testing.assert_close(lazy[k], dense[k], rtol=0, atol=1e-6)


LAZY_OPTIMS = [
    (optim.Adam, {"lr": 0.05}),
    (optim.Adam, {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}),
    (optim.AdamW, {"lr": 0.05}),
    (optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    (optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (optim.Adadelta, {"lr": 1.0}),
    (optim.ClippedAdam, {"lr": 0.05, "clip_norm": 1.0, "lrd": 0.99}),
]


@pytest.mark.parametrize("make,args", LAZY_OPTIMS)
def test_lazy_row_equals_the_torch_optimizer_on_that_row(make, args):
    """A row visited at every step moves exactly as the optimizer moves a param alone."""
    every = [torch.tensor([3, 5])] * 6
    pyro.clear_param_store()
    svi = SVI(model, guide, make(args, local_updates="lazy"), Trace_ELBO())
    for idx in every:
        svi.step(idx)
    got = pyro.param("z_value").detach()
    constructor = make(args).pt_optim_constructor
    w = torch.zeros(2, D, dtype=torch.float64, requires_grad=True)
    opt = constructor([w], **args)
    prior = torch.distributions.Gamma(2.0 * torch.ones(D, dtype=torch.float64), 1.0)
    for _ in every:
        z = w.exp()
        loss = -(N / 2) * (prior.log_prob(z).sum() + torch.distributions.Normal(z, 1.0).log_prob(X[[3, 5]]).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(got[[3, 5]], w.detach().exp(), rtol=0, atol=1e-6)
    assert torch.equal(got[0], torch.ones(D, dtype=torch.float64))


def test_lazy_with_clipping_scheduler_and_per_param_options():
    def per_param(name):
        return {"lr": 0.1 if name == "z_value" else 0.01}

    sched = optim.StepLR(
        {"optimizer": torch.optim.Adam, "optim_args": per_param, "step_size": 1, "gamma": 0.5},
        clip_args={"clip_norm": 0.5},
        local_updates="lazy",
    )
    pyro.clear_param_store()
    svi = SVI(model, guide, sched, Trace_ELBO())
    idx = torch.tensor([3, 5])
    svi.step(idx)
    first = pyro.param("z_value").detach().clone()
    sched.step()
    svi.step(idx)
    second = pyro.param("z_value").detach()
    # Adam's first step moves each coordinate by lr (sign of the clipped grad); the second
    # by about half of it, after the schedule halved lr.
    step1 = (first[[3, 5]].log() - 0.0).abs()
    torch.testing.assert_close(step1, torch.full_like(step1, 0.1), rtol=0, atol=1e-6)
    step2 = (second[[3, 5]].log() - first[[3, 5]].log()).abs()
    assert torch.all(step2 < 0.06) and torch.all(step2 > 0.02)
    assert sched.get_state()["params"]["z_value"]["rows"]["step"][[3, 5]].tolist() == [2.0, 2.0]


def test_lazy_state_round_trips():
    """Stop after 3 steps, save params and optimizer state, resume on a fresh optimizer:
    equals 5 uninterrupted steps."""
    _, full = run(optim.Adam({"lr": 0.05}, local_updates="lazy"), steps=5)
    first = optim.Adam({"lr": 0.05}, local_updates="lazy")
    run(first, steps=3)
    saved_params, saved_optim = pyro.get_param_store().get_state(), first.get_state()
    assert saved_optim["z_value"]["rows"]["step"].shape == (N,)
    pyro.clear_param_store()
    pyro.get_param_store().set_state(saved_params)
    resumed = optim.Adam({"lr": 0.05}, local_updates="lazy")
    resumed.set_state(saved_optim)
    svi = SVI(model, guide, resumed, Trace_ELBO())
    for i in (3, 4):
        svi.step(BATCHES[i])
    torch.testing.assert_close(pyro.param("z_value").detach(), full["z_value"], rtol=0, atol=1e-9)


def test_bad_local_updates_is_one_clear_message():
    with pytest.raises(ValueError, match="local_updates must be 'dense' or 'lazy'"):
        optim.Adam({"lr": 0.1}, local_updates="sparse")


def test_predictive_and_autonormal_locals_after_lazy_training():
    losses, params = run(optim.Adam({"lr": 0.05}, local_updates="lazy"), AutoNormal)
    assert params["AutoNormal.locs.z"].shape == (N, D)
    assert all(torch.isfinite(torch.tensor(losses)))
    g = AutoNormal(model, create_plates=lambda idx, x=X: pyro.plate("data", N, subsample=idx))
    pyro.clear_param_store()
    svi = SVI(model, g, optim.Adam({"lr": 0.05}, local_updates="lazy"), Trace_ELBO())
    svi.step(BATCHES[0])
    before = pyro.param("AutoNormal.locs.z").detach().clone()
    svi.step(BATCHES[0])
    after = pyro.param("AutoNormal.locs.z").detach()
    assert torch.equal(before[11], after[11]) and not torch.equal(before[0], after[0])
    samples = Predictive(model, guide=g, num_samples=3)(torch.arange(N))
    assert samples["z"].shape == (3, N, D)


def test_module_local_params_in_a_plate_still_train():
    class Local(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.value = pyro.nn.PyroParam(torch.ones(N, D, dtype=torch.float64), constraints.positive, event_dim=1)

        def forward(self, idx, x=X):
            with pyro.plate("data", N, subsample=idx):
                pyro.sample("z", dist.Delta(self.value, event_dim=1))

    pyro.clear_param_store()
    g = Local()
    svi = SVI(model, g, optim.Adam({"lr": 0.05}, local_updates="lazy"), Trace_ELBO())
    svi.step(BATCHES[0])
    assert not torch.equal(g.value.detach(), torch.ones(N, D, dtype=torch.float64))

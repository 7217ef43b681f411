"""The built-in models with a latent per datapoint: the conjugate one recovers every row's
exact posterior, the Poisson factorization trains, and held-out rows (whose latents the
guide's per-row params do not cover) are scored by refitting their local latents."""

from __future__ import annotations

import pytest
import torch
from train_helpers import CONFIGS, dirs, scalars

import distsvi
from distsvi import cli
from distsvi.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from distsvi.infer.autoguide import AutoNormal
from distsvi.train.data import Split, synthetic_counts, synthetic_local
from distsvi.train.heldout import heldout_loss, local_sites
from distsvi.train.models import LocalNormal, PoissonFactorization


def train(*args: str) -> None:
    assert cli.main(["train", *args]) == 0


def test_local_normal_recovers_every_rows_exact_posterior():
    distsvi.clear_param_store()
    distsvi.set_rng_seed(0)
    m = LocalNormal(latent_dim=4)
    x, obs = synthetic_local(num_points=400, latent_dim=4)
    guide = AutoNormal(m.model)
    svi = SVI(m.model, guide, distsvi.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for step in range(2000):
        if step in (700, 1400):  # anneal so the Monte-Carlo noise of the last steps is small
            for g in svi.optim.optimizer.param_groups:
                g["lr"] /= 5
        svi.step(x, obs, size=400)
    mean, sd = m.exact_posterior(obs)
    loc, scale = guide.locs.z.detach(), guide.scales.z.detach()
    assert loc.shape == scale.shape == (400, 4)
    # Within Monte-Carlo noise of the exact posterior, row by row (a wrong row, or the
    # posterior of another model, is off by several sds).
    err = ((loc - mean) / sd).abs()
    assert err.mean() < 0.06 and err.max() < 0.25
    assert ((scale - sd) / sd).abs().max() < 0.15


def test_local_sites_are_the_per_datapoint_latents_of_an_autoguide():
    counts, obs = synthetic_counts(num_points=50, num_genes=6, num_factors=2)
    m = PoissonFactorization(num_genes=6, num_factors=2)
    probe = Split((counts, obs), (counts[:0], obs[:0]), torch.zeros(0)).head(1)
    assert local_sites(m.model, AutoNormal(m.model), probe) == ("theta",)
    assert local_sites(m.model, lambda *a, **k: None, probe) == ()


def test_heldout_refit_leaves_the_trained_params_alone():
    distsvi.clear_param_store()
    distsvi.set_rng_seed(0)
    m = PoissonFactorization(num_genes=6, num_factors=2)
    counts, obs = synthetic_counts(num_points=120, num_genes=6, num_factors=2)
    train_rows, val_rows = (counts[:100], obs[:100]), (counts[100:], obs[100:])
    guide = AutoNormal(m.model)
    svi = SVI(m.model, guide, distsvi.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(50):
        svi.step(*train_rows, size=100, subsample_size=20)
    store = distsvi.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    adam_state = {k: v["exp_avg"].clone() for k, v in svi.optim.optimizer.state.items()}
    probe = Split(train_rows, val_rows, torch.arange(100, 120)).head(1)
    first = heldout_loss(m.model, guide, ("theta",), probe, val_rows, 0.05)
    again = heldout_loss(m.model, guide, ("theta",), probe, val_rows, 0.05)
    assert dict(store.items()).keys() == before.keys()
    for k, v in store.items():
        assert torch.equal(v.detach(), before[k]), k
    for p, state in svi.optim.optimizer.state.items():
        assert torch.equal(state["exp_avg"], adam_state[p])
    assert torch.isfinite(torch.tensor(first))
    # Refitting starts from the same place every time: only the Monte-Carlo draws differ.
    assert again == pytest.approx(first, rel=0.05)


def test_poisson_factorization_job_trains_and_predicts(tmp_path):
    config = str(CONFIGS / "poisson_factorization.yaml")
    common = ["data.options.num_points=3000", "data.options.num_genes=20", "run.progress=none"]
    train(config, "run.steps=300", "run.val_every=100", "run.log_every=50", *common,
          *dirs(tmp_path))
    val = scalars(tmp_path / "tb")["loss/val"]
    assert val[300] < val[100]
    ck = max((tmp_path / "ck").glob("step_*.pt"))
    out = tmp_path / "samples.pt"
    argv = ["predict", config, "--checkpoint", str(ck), "--num-samples", "3", "--out", str(out)]
    assert cli.main([*argv, *common, *dirs(tmp_path)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["samples"]["obs"].shape == (3, 30, 20)
    assert saved["samples"]["theta"].shape == (3, 30, 8)

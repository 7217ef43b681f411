"""Per-datapoint params read as the batch's rows, updated densely: Pyro 1.9.2's numbers
over 20 Adam steps, with AutoDelta and AutoNormal on a model with a subsampled local
latent (the guide's draws are equal under the same seed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pyro")

from parity_harness import both

N, B = 10, 4
X = torch.linspace(-1.0, 2.0, N * 3, dtype=torch.float64).reshape(N, 3)
g = torch.Generator().manual_seed(1)
BATCHES = [torch.randperm(N, generator=g)[:B] for _ in range(20)]


def trajectory(P, guide_name: str) -> list:
    from importlib import import_module

    P.pyro.clear_param_store()
    torch.manual_seed(0)

    def model(idx):
        mu = P.pyro.sample("mu", P.dist.Normal(torch.zeros((), dtype=X.dtype), 2.0))
        with P.pyro.plate("data", N, subsample=idx):
            z = P.pyro.sample(
                "z", P.dist.LogNormal(mu * torch.ones(3, dtype=X.dtype), 1.0).to_event(1)
            )
            P.pyro.sample("x", P.dist.Normal(z, 0.5).to_event(1), obs=X[idx])

    cls = getattr(import_module(f"{P.name}.infer.autoguide"), guide_name)
    guide = cls(model, create_plates=lambda idx: P.pyro.plate("data", N, subsample=idx))
    svi = P.infer.SVI(model, guide, P.optim.Adam({"lr": 0.05}), P.infer.Trace_ELBO())
    store = P.pyro.get_param_store()
    out = []
    for idx in BATCHES:
        loss = svi.step(idx)
        out.append((loss, {k: store[k].detach().clone() for k in store.keys()}))  # noqa: SIM118
    P.pyro.clear_param_store()
    return out


@pytest.mark.parametrize("guide_name", ["AutoDelta", "AutoNormal"])
def test_dense_local_updates_match_pyro_over_20_adam_steps(guide_name):
    want, got = (trajectory(P, guide_name) for P in both())
    for step, ((want_loss, want_p), (got_loss, got_p)) in enumerate(zip(want, got)):
        assert abs(got_loss - want_loss) <= 1e-6 * max(1.0, abs(want_loss)), f"loss, step {step}"
        assert set(got_p) == set(want_p)
        for k, v in want_p.items():
            torch.testing.assert_close(
                got_p[k],
                v,
                rtol=0,
                atol=1e-6,
                msg=lambda m, k=k, step=step: f"{k}, step {step}: {m}",
            )

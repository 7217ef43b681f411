"""The conjugate-model runs of ``test_dp_conjugate.py``: ``LocalNormal`` with AutoNormal on
``N`` rows, trained with lazy Adam and sharded local params on each rank
(:func:`sharded_lazy`, module level so the harness can pickle it), and with dense Adam in
one process (:func:`dense_one_process`), on the same lr schedule for the same epochs.

The loss is :class:`STL_ELBO`: Trace_ELBO's value with the "sticking the landing" gradient
(Roeder et al., 2017), averaged over ``PARTICLES`` vectorized particles. Its gradient is
unbiased with the same fixed point as Trace_ELBO's, and for an exact variational family
(AutoNormal of a conjugate Normal model) its variance vanishes at the optimum, so each row
converges to its exact posterior instead of stopping at a noise floor set by the lr: with
Trace_ELBO's gradient, holding all 2e5 values of 1e5 rows within 3 % of an sd would take
about 3e4 one-sample gradients per row (Adam's noise floor), far over this test's budget.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributions as td

import distsvi
from distsvi.distributed import DataParallelSVI, ProcessGroup, seed_rank, shard_indices
from distsvi.infer import SVI, Trace_ELBO
from distsvi.infer.autoguide import AutoNormal
from distsvi.optim import LambdaLR
from distsvi.poutine.trace_struct import scale_and_mask
from distsvi.train.data import synthetic_local
from distsvi.train.models import LocalNormal

N = 100_000  # rows of the "data" plate
D = 2  # latent dims per row (2e5 posterior means and sds checked)
WORLD = 2
B = 5_000  # batch per rank: 10 steps per epoch over a rank's block of 50 000 rows
EPOCHS = 60  # every row is updated once per epoch (lazy), so 60 updates per row
HOLD = 20  # epochs at LR0, then exponential decay to LR_FINAL at the last epoch
LR0, LR_FINAL = 0.3, 1e-3
BETAS = (0.5, 0.8)  # short memories: Adam's scale follows the shrinking STL gradient
PARTICLES = 4
EVALS = 3  # full-data loss evaluations averaged for the final ELBO
NAMES = ("AutoNormal.locs.z", "AutoNormal.scales.z")


def lr_factor(epoch: int) -> float:
    """The lr at ``epoch`` (0-based) as a multiple of LR0: 1 for HOLD epochs, then an
    exponential decay reaching LR_FINAL / LR0 at the last epoch."""
    t = max(0, epoch - HOLD) / (EPOCHS - 1 - HOLD)
    return (LR_FINAL / LR0) ** t


def data() -> torch.Tensor:
    """The observations, drawn from the model's prior (seeded, the same on every rank)."""
    _, obs = synthetic_local(N, D, seed=0)
    return obs.to(torch.get_default_dtype())


def _detached(fn):
    """``fn`` (a Normal, maybe wrapped in Independent) with its params detached, or None."""
    if isinstance(fn, td.Independent):
        base = _detached(fn.base_dist)
        return None if base is None else td.Independent(base, fn.reinterpreted_batch_ndims)
    if isinstance(fn, td.Normal):
        return td.Normal(fn.loc.detach(), fn.scale.detach(), validate_args=False)
    return None


class STL_ELBO(Trace_ELBO):
    """Trace_ELBO for fully reparameterised guides, with the path-derivative ("sticking the
    landing") gradient: a Normal guide site's ``log q`` is differentiated through its sample
    only, not through its params (the omitted score term has mean zero). The loss value is
    Trace_ELBO's, bit for bit."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
        surrogate = elbo
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if not site["fn"].has_rsample:
                raise NotImplementedError("STL_ELBO needs reparameterised guide sites")
            elbo = elbo - site["log_prob_sum"]
            q = _detached(site["fn"])
            if q is None:  # AutoNormal's Delta site of z (log-density 0): as Trace_ELBO
                surrogate = surrogate - site["log_prob_sum"]
            else:
                lp = q.log_prob(site["value"])
                surrogate = surrogate - scale_and_mask(lp, site["scale"], site["mask"]).sum()
        return (-elbo).detach(), -surrogate


def make_svi(local_updates: str) -> tuple[LocalNormal, LambdaLR, SVI]:
    model = LocalNormal(latent_dim=D)
    guide = AutoNormal(model.model)  # default init: loc 0, scale 0.1
    optim = LambdaLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": LR0, "betas": BETAS},
            "lr_lambda": lr_factor,
        },
        local_updates=local_updates,
    )
    # max_plate_nesting given: with vectorized particles and no bound, the ELBO's trial run
    # that guesses it creates the locals unsharded (all N rows on every rank).
    loss = STL_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    return model, optim, SVI(model.model, guide, optim, loss)


def params() -> dict[str, torch.Tensor]:
    """AutoNormal's loc and (constrained) scale of z, as this process stores them."""
    store = distsvi.get_param_store()
    return {name: store[name].detach().clone() for name in NAMES}


def sharded_lazy(group: ProcessGroup) -> dict:
    """Lazy Adam + sharded locals: EPOCHS epochs of B-row batches from this rank's block."""
    seed_rank(0, group)
    obs = data()
    _, optim, svi = make_svi("lazy")
    dp = DataParallelSVI(svi, group, local_params="sharded", seed=0)
    block = shard_indices(N, group.rank, group.world_size)
    steps = math.ceil(len(block) / B)
    epochs = []  # each epoch's batches, in order
    lrs = []  # the lr each epoch trained with
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        drawn = []
        for _ in range(steps):
            dp.step(obs, obs, size=N, subsample_size=B)
            drawn.append(dp.shards.indices("data").clone())
        epochs.append(torch.stack(drawn))
        lrs.append(optim.scheduler.get_last_lr()[0])
        optim.step()  # one lr-schedule step per epoch
    with torch.no_grad():
        losses = [dp.evaluate_loss(obs, obs, size=N) for _ in range(EVALS)]
    return {
        "params": params(),
        "block": (int(block[0]), int(block[-1]) + 1),
        "epochs": torch.stack(epochs),  # (EPOCHS, steps, B)
        "losses": losses,
        "lrs": lrs,
        "seconds": time.perf_counter() - t0,
    }


def dense_one_process() -> dict:
    """Dense Adam in one process: the same schedule and epochs, batches of the union
    size W * B walked through a fresh permutation of all N rows each epoch."""
    distsvi.clear_param_store()
    distsvi.set_rng_seed(0)
    obs = data()
    _, optim, svi = make_svi("dense")
    gen = torch.Generator().manual_seed(1)
    batch = WORLD * B
    lrs = []
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        perm = torch.randperm(N, generator=gen)
        for first in range(0, N, batch):
            idx = perm[first : first + batch]
            svi.step(obs[idx], obs[idx], size=N, subsample=idx)
        lrs.append(optim.scheduler.get_last_lr()[0])
        optim.step()
    with torch.no_grad():
        losses = [svi.evaluate_loss(obs, obs, size=N) for _ in range(EVALS)]
    seconds = time.perf_counter() - t0
    out = {"params": params(), "losses": losses, "lrs": lrs, "seconds": seconds}
    distsvi.clear_param_store()
    return out

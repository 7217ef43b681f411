"""Sharded local params on 2 real Gloo ranks: each rank stores and steps only its own block
of rows, never all-reduces them, and the run equals the replicated one and one process on
the union of the ranks' batches."""

from __future__ import annotations

import math

import local_workers as w
import pytest
import torch
from dp_harness import ok, run_ranks

import distsvi as pyro
from distsvi.distributed import shard_indices
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

N, B, STEPS = 37, 6, 20  # uneven blocks: 19 and 18 rows


def one_process(local_updates: str, schedule) -> dict:
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = w.data(N)
    svi = SVI(
        w.local_model, w.guide(), Adam({"lr": 0.05}, local_updates=local_updates), Trace_ELBO()
    )
    for per_rank in schedule:
        svi.step(x, idx=torch.cat(per_rank))
    out = w.snapshot()
    pyro.clear_param_store()
    return out


def joined(ranks: list[dict]) -> dict:
    """The sharded ranks' params as one process holds them (blocks concatenated)."""
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    out = {}
    for name in p0:
        if name == "AutoDelta.z":
            assert p0[name].shape[0] == len(shard_indices(N, 0, 2)) == 19
            assert p1[name].shape[0] == len(shard_indices(N, 1, 2)) == 18
            out[name] = torch.cat([p0[name], p1[name]])
        else:
            torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=0)
            out[name] = p0[name]
    return out


def close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, v in want.items():
        torch.testing.assert_close(got[name], v, rtol=1e-6, atol=1e-6, msg=name)


def test_sharded_dense_equals_replicated_and_one_process(float64):
    schedule = w.batches(N, 2, B, STEPS)
    rep = ok(run_ranks(w.given_batches, N, B, STEPS, "replicated", "dense", dtype=torch.float64))
    sh = ok(run_ranks(w.given_batches, N, B, STEPS, "sharded", "dense", dtype=torch.float64))
    want = one_process("dense", schedule)
    close(rep[0]["params"], want)
    close(joined(sh), want)
    # unvisited rows moved too (dense Adam's momentum), and every row is this rank's
    assert sh[0]["losses"] == pytest.approx(rep[0]["losses"], rel=1e-9)
    # only the global param is all-reduced when locals are sharded
    assert sh[0]["allreduce_bytes"] == w.D * 8 + 8
    assert rep[0]["allreduce_bytes"] == (N * w.D + w.D) * 8 + 8
    assert sh[0]["val"] == pytest.approx(rep[0]["val"], rel=1e-9)


def test_sharded_lazy_equals_one_process_lazy(float64):
    schedule = w.batches(N, 2, B, STEPS)
    sh = ok(run_ranks(w.given_batches, N, B, STEPS, "sharded", "lazy", dtype=torch.float64))
    want = one_process("lazy", schedule)
    close(joined(sh), want)
    visited = set(torch.cat([torch.cat(s) for s in schedule]).tolist())
    init = torch.full((w.D,), 0.2, dtype=torch.float64)
    z = joined(sh)["AutoDelta.z"]
    for i in range(N):
        assert torch.equal(z[i], init) == (i not in visited), i


def test_sharded_plate_draws_from_its_own_block(float64):
    n, batch, steps = 36, 5, 12
    r0, r1 = ok(run_ranks(w.drawn_batches, n, batch, steps, "lazy", dtype=torch.float64))
    for rank, r in enumerate((r0, r1)):
        block = set(shard_indices(n, rank, 2).tolist())
        for idx in r["indices"]:
            assert len(idx) == batch and set(idx.tolist()) <= block
    # each epoch (3 steps of 5 of a block of 18) is a reshuffle of the block
    assert r0["indices"][0].tolist() != r0["indices"][3].tolist()
    # equal blocks: W * |block| / B == N / B, so one process on the union takes the same steps
    global N
    old, N = N, n
    try:
        want = one_process("lazy", [[a, b] for a, b in zip(r0["indices"], r1["indices"])])
        got = joined_any(r0, r1)
    finally:
        N = old
    close(got, want)


def joined_any(r0: dict, r1: dict) -> dict:
    out = dict(r0["params"])
    out["AutoDelta.z"] = torch.cat([r0["params"]["AutoDelta.z"], r1["params"]["AutoDelta.z"]])
    return out


def test_vectorized_particles_without_a_nesting_bound_store_only_the_ranks_rows():
    n, batch = 11, 4
    r0, r1 = ok(run_ranks(w.vectorized_unbounded, n, batch))
    for rank, r in enumerate((r0, r1)):
        assert r["nesting"] == 2  # the data plate and the particle plate
        assert r["shapes"]["AutoDelta.z"] == (len(shard_indices(n, rank, 2)), w.D)
        assert r["shapes"]["AutoDelta.mu"] == (w.D,)
        assert all(map(math.isfinite, r["losses"]))

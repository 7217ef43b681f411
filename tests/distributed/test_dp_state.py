"""Invariants 3, 4 and 6 on 2 real Gloo ranks: identical state, lazily created params
broadcast and checked, non-finite steps skipped together, one collective per bucket."""

from __future__ import annotations

import dp_workers as w
import pytest
import torch
from dp_harness import RankError, assert_same, ok, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def test_params_and_optimizer_state_bitwise_identical_after_50_steps(backend):
    r0, r1 = ok(run_ranks(w.identical_state, 50, backend=backend))
    assert_same(r0["params"], r1["params"])
    assert_same(r0["optim"], r1["optim"])
    assert torch.is_tensor(r0["optim"]["AutoNormal.locs.z"]["state"][0]["exp_avg"])
    assert r0["losses"] == r1["losses"]
    assert not torch.equal(r0["noise"], r1["noise"]), "Monte-Carlo noise must differ per rank"


def test_new_params_take_rank_0_values(backend):
    r0, r1 = ok(run_ranks(w.lazy_broadcast, backend=backend))
    # lr=0: after the step both ranks hold rank 0's initial values, not their own.
    assert_same(r0["after_one"], r1["after_one"])
    assert torch.equal(r0["after_one"]["w_loc"], torch.full((4,), 1.0))
    assert torch.equal(r0["after_one"]["b_loc"], torch.tensor(-1.0))
    assert_same(r0["after_five"], r1["after_five"])
    assert not torch.equal(r0["after_five"]["w_loc"], torch.full((4,), 1.0))


@pytest.mark.parametrize("from_call", [0, 4], ids=["first-step", "later-step"])
def test_param_created_on_one_rank_fails_on_every_rank_with_its_name(from_call, backend):
    results = run_ranks(w.mismatched_params, from_call, timeout=60, backend=backend)
    for rank, r in enumerate(results):
        assert isinstance(r, RankError), f"rank {rank} did not fail"
        assert r.type == "RuntimeError", r.traceback
        assert "only_on_rank_1" in r.message and "differ across ranks" in r.message


def test_nan_gradient_on_one_rank_skips_the_step_on_both(backend):
    r0, r1 = ok(run_ranks(w.nan_on_rank_1, {5}, 3, backend=backend))
    for r in (r0, r1):
        h = r["history"]  # h[k] is the state after step k + 1
        assert_same(h[3], h[4])  # step 5 skipped
        assert not torch.equal(h[4]["w_loc"], h[5]["w_loc"])  # training went on
        assert not torch.equal(h[2]["w_loc"], h[3]["w_loc"])
        assert r["num_skipped"] == 1
    assert_same(r0["history"], r1["history"])


def test_too_many_non_finite_steps_in_a_row_stop_every_rank(backend):
    results = run_ranks(w.nan_on_rank_1, set(range(3, 11)), 3, timeout=60, backend=backend)
    for r in results:
        assert isinstance(r, RankError) and r.type == "FloatingPointError", r
        assert "3 steps in a row" in r.message


@pytest.mark.parametrize("cap_mb", [25.0, 0.05])
def test_one_collective_per_bucket_not_per_param(cap_mb, backend):
    r0, r1 = ok(run_ranks(w.count_collectives, cap_mb, backend=backend))
    assert r0["params"] == 200
    expected_buckets = 1 if cap_mb == 25.0 else 4  # 200 params of 1000 bytes, 52 per bucket
    for r in (r0, r1):
        assert r["buckets"] == expected_buckets
        assert len(r["calls"]) == 3 * expected_buckets, r["calls"]  # 3 steps


def test_every_loss_keeps_ranks_identical(backend):
    r0, r1 = ok(run_ranks(w.every_loss, 10, backend=backend))
    assert r0.keys() == {"Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO"}
    for name in r0:
        assert_same(r0[name], r1[name])
        assert all(torch.isfinite(torch.tensor(r0[name]["losses"]))), name


def test_every_autoguide_keeps_ranks_identical_and_learns(backend):
    r0, r1 = ok(run_ranks(w.every_autoguide, 60, backend=backend))
    assert r0.keys() == w.AUTOGUIDES.keys()
    for name in r0:
        assert_same(r0[name]["params"], r1[name]["params"])
        assert r0[name]["losses"] == r1[name]["losses"], name
        assert r0[name]["full"] == r1[name]["full"], name
        first, last = r0[name]["losses"][:10], r0[name]["losses"][-10:]
        assert sum(last) < 0.9 * sum(first), f"{name} did not learn: {first} -> {last}"


def test_module_buffers_follow_rank_0(backend):
    r0, r1 = ok(run_ranks(w.batchnorm_buffers, 5, backend=backend))
    assert_same(r0["buffers"], r1["buffers"])
    assert_same(r0["params"], r1["params"])
    mean = r0["buffers"]["0.running_mean"]
    assert not torch.allclose(mean, torch.zeros(3)), "the statistics must have moved"
    assert int(r0["buffers"]["0.num_batches_tracked"]) >= 5


@pytest.mark.timeout(600)
def test_compiled_steps_take_the_eager_steps_on_two_ranks():
    r0, r1 = ok(run_ranks(w.compiled_and_eager, 12, timeout=540))
    assert r0["compiled"]["compiled"] and not r0["eager"]["compiled"]
    assert_same(r0["compiled"]["params"], r1["compiled"]["params"])
    assert r0["compiled"]["losses"] == r1["compiled"]["losses"]
    torch.testing.assert_close(
        torch.tensor(r0["compiled"]["losses"]),
        torch.tensor(r0["eager"]["losses"]),
        rtol=1e-4,
        atol=1e-4,
    )
    for name, value in r0["eager"]["params"].items():
        torch.testing.assert_close(r0["compiled"]["params"][name], value, rtol=1e-5, atol=1e-6)


def test_buckets_start_during_backward_and_change_no_number(backend):
    """With several buckets the first ones are all-reduced while backward still runs;
    the params after 8 steps are bit for bit those of reducing after backward."""
    over = ok(run_ranks(w.overlapped, True, 1, 8, backend=backend))
    after = ok(run_ranks(w.overlapped, False, 1, 8, backend=backend))
    for r0, r1 in (over, after):
        assert r0["buckets"] >= 3
        assert_same(r0["params"], r1["params"])
    assert_same(over[0]["params"], after[0]["params"])
    assert over[0]["overlap"] and not after[0]["overlap"]
    # The bucket with the loss waits for backward's end; the others started before it.
    assert over[0]["early"][1:] == [over[0]["buckets"] - 1] * 7
    assert after[0]["early"] == [0] * 8


def test_a_loss_with_two_backward_passes_does_not_overlap(backend):
    r0, r1 = ok(run_ranks(w.overlapped, True, 2, 3, backend=backend))
    assert not r0["overlap"] and r0["early"] == [0, 0, 0]
    assert_same(r0["params"], r1["params"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_small_buckets_gathered_and_summed_average_like_the_all_reduce(world_size):
    results = ok(run_ranks(w.gather_vs_all_reduce, world_size=world_size))
    n_buckets = len(results[0]["buckets"])
    assert n_buckets >= 3 and results[0]["buckets"][0] == [0]
    expected = [
        torch.stack([r["inputs"][i] for r in results]).mean(0)
        for i in range(len(results[0]["inputs"]))
    ]
    loss = sum(range(1, world_size + 1)) / world_size
    for r in results:
        # the 280 KB bucket is all-reduced either way; the small ones are gathered
        gather = (  # its name from torch 2.13 on
            "all_gather_single"
            if hasattr(torch.distributed, "all_gather_single")
            else "all_gather_into_tensor"
        )
        assert r["gather"]["used"] == ["all_reduce"] + [gather] * (n_buckets - 1)
        assert r["all_reduce"]["used"] == ["all_reduce"] * n_buckets
        for mode in ("gather", "all_reduce"):
            for got, want in zip(r[mode]["avg"], expected):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert r[mode]["trailer"][0].item() == pytest.approx(loss)
            assert r[mode]["trailer"][1].item() == 0.0
            assert r[mode]["trailer"][2].item() == 0.0  # every averaged value is finite
        # one rank's NaN or inf is flagged on every rank
        assert r["nonfinite 2"][2].item() == 1.0 and r["nonfinite 0"][2].item() == 1.0
    # gathered rows are summed in the same order everywhere: bitwise the same on all ranks
    for r in results[1:]:
        assert_same(r["gather"]["avg"], results[0]["gather"]["avg"])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_average_and_check_divides_and_flags_non_finite_values(monkeypatch, fused, world_size):
    from distsvi.distributed.reduce import average_and_check_

    if not fused:  # what a torch without the fused kernel for this device runs

        def missing(*args):
            raise NotImplementedError

        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    g = torch.Generator().manual_seed(0)
    sums = [torch.randn(n, generator=g) for n in (5, 1000)] + [torch.randn(3).double()]
    flats = [t.clone() for t in sums]
    assert average_and_check_(flats, world_size).tolist() == [0.0]
    for got, s in zip(flats, sums):
        torch.testing.assert_close(got, s / world_size, rtol=1e-7, atol=0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        flats = [t.clone() for t in sums]
        flats[1][7] = bad
        assert average_and_check_(flats, world_size).tolist() == [1.0]

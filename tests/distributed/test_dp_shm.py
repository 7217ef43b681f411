"""Gradients averaged through shared memory (CPU ranks of one machine), on real Gloo
ranks: the same training as Gloo's all-reduce, identical ranks, the fallback when ranks
cannot see each other's segments, and nothing left behind."""

from __future__ import annotations

import dp_workers as w
import pytest
import shm_workers as sw
import torch
from dp_harness import RankError, assert_same, ok, run_ranks

from distsvi.distributed.shm import SPIN_BARRIERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

BARRIERS = [
    pytest.param(
        True,
        id="counter-barriers",
        marks=pytest.mark.skipif(not SPIN_BARRIERS, reason="counter barriers need x86"),
    ),
    pytest.param(False, id="gloo-barriers"),
]


@pytest.mark.parametrize("spin", BARRIERS)
def test_two_ranks_train_exactly_as_with_gloo_and_leave_no_files(tmp_path, spin):
    r0, r1 = ok(run_ranks(sw.shm_vs_gloo, str(tmp_path), 12, spin))
    for r in (r0, r1):
        assert r["shm"]["reducer"] == "SharedMemoryReducer"
        assert r["gloo"]["reducer"] == "BucketReducer"
        # the sum of two ranks is exact in either order, and 1/2 is exact: same bits
        assert_same(r["shm"]["params"], r["gloo"]["params"])
        assert r["shm"]["losses"] == pytest.approx(r["gloo"]["losses"], rel=1e-6)
        assert r["shm"]["left_in_dir"] == []  # removed once every rank mapped it
    assert_same(r0["shm"]["params"], r1["shm"]["params"])
    assert r0["shm"]["losses"] == r1["shm"]["losses"]
    for name, value in r0["shm"]["params"].items():
        assert not torch.equal(value, r0["shm"]["init"][name]), f"{name} did not train"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spin", BARRIERS)
def test_three_ranks_match_gloo_and_each_other(tmp_path, spin):
    results = ok(run_ranks(sw.shm_vs_gloo, str(tmp_path), 12, spin, world_size=3, timeout=120))
    for r in results:
        assert r["shm"]["reducer"] == "SharedMemoryReducer"
        for name, value in r["shm"]["params"].items():
            # 1/3 is not exact and the ring sums in another order: equal to rounding
            torch.testing.assert_close(value, r["gloo"]["params"][name], rtol=1e-5, atol=1e-6)
    for r in results[1:]:
        assert_same(results[0]["shm"]["params"], r["shm"]["params"])


@pytest.mark.parametrize("spin", BARRIERS)
def test_default_uses_shared_memory_where_it_is_faster(tmp_path, spin):
    # Counter barriers take microseconds: any size. Gloo barriers cost two collectives,
    # more than Gloo's gather of a few kilobytes.
    small = "SharedMemoryReducer" if spin else "BucketReducer"
    for r in ok(run_ranks(sw.auto_choice, str(tmp_path), spin)):
        assert r == {"small": small, "wide": "SharedMemoryReducer"}


def test_ranks_that_cannot_map_each_others_segments_all_use_gloo(tmp_path):
    r0, r1 = ok(run_ranks(sw.private_dirs, str(tmp_path), 6))
    for r in (r0, r1):
        assert r["reducer"] == "BucketReducer"
        assert_same(r["params"], r["reference"]["params"])
        assert r["left_in_dir"] == []
    assert_same(r0["params"], r1["params"])


def test_without_a_shared_memory_directory_a_forced_run_uses_gloo_and_says_why(tmp_path):
    missing = tmp_path / "no_such_dir"
    for r in ok(run_ranks(sw.no_shm_dir, str(missing))):
        assert r["reducer"] == "BucketReducer"
        assert any("Gloo" in m and str(missing) in m for m in r["said"]), r["said"]
        assert not torch.equal(r["params"]["0.weight"], r["init"]["0.weight"])


def test_nan_gradient_on_one_rank_skips_the_step_on_both(tmp_path):
    r0, r1 = ok(run_ranks(w.nan_on_rank_1, {5}, 3, True))
    for r in (r0, r1):
        h = r["history"]
        assert r["reducer"] == "SharedMemoryReducer"
        assert_same(h[3], h[4])  # step 5 skipped
        assert not torch.equal(h[4]["w_loc"], h[5]["w_loc"])
        assert r["num_skipped"] == 1
    assert_same(r0["history"], r1["history"])


def test_a_rank_that_raises_ends_the_other_instead_of_hanging(tmp_path):
    r0, r1 = run_ranks(sw.rank_1_fails, str(tmp_path), timeout=60)
    assert isinstance(r1, RankError) and "failed on rank 1" in r1.message, r1
    assert isinstance(r0, RankError), "rank 0 must fail when its peer is gone"
    if SPIN_BARRIERS:  # the counter barrier sees rank 1's process exit, and names it
        assert r0.type == "PeerExited" and "rank 1 (pid" in r0.message, r0.traceback
    assert list(tmp_path.iterdir()) == []


def test_the_job_reads_a_peers_exit_as_another_ranks_failure():
    """Under the launcher, rank 0 then says "another rank failed" in one line instead of
    reporting an error of its own, so the launcher's root cause stays the failed rank's."""
    from distsvi import cli
    from distsvi.distributed.shm import PeerExited

    assert cli._peer_failed(PeerExited("rank 1 (pid 5) exited while rank 0 waited"))
    assert not cli._peer_failed(RuntimeError("the user's model failed"))

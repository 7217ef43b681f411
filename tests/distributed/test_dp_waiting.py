"""CPU ranks: how a rank waits for the gradient all-reduce (it polls for a bounded time,
then blocks), the allocator setting that keeps a step's buffers mapped, and core pinning."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import dp_workers as w
import pytest
import torch
from dp_harness import assert_same, ok, run_ranks

from distsvi.distributed import DataParallelSVI, pin_to_cores
from distsvi.infer import SVI, Trace_ELBO
from distsvi.optim import Adam


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_polling_and_blocking_take_the_same_steps():
    polled = ok(run_ranks(w.identical_state, 10, 20.0))
    blocked = ok(run_ranks(w.identical_state, 10, 0.0))
    assert_same(polled[0]["params"], blocked[0]["params"])
    assert_same(polled[1]["params"], blocked[1]["params"])
    assert polled[0]["losses"] == blocked[0]["losses"]


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("busy_wait_s", [0.0, 0.05, 5.0])
def test_a_late_rank_is_waited_for_and_polling_stops_at_its_bound(busy_wait_s):
    late = 0.6
    r0, r1 = ok(run_ranks(w.late_peer, late, busy_wait_s))
    for r in (r0, r1):
        assert torch.equal(r["value"], torch.full((1000,), 3.0))  # 1 + 2: the sum of ranks
    assert r0["wall"] >= late - 0.1  # rank 0 waited for rank 1
    if busy_wait_s < late:
        # polling stopped after busy_wait_s: the rest of the wait blocked, using no CPU
        assert r0["cpu"] < busy_wait_s + 0.25, r0
    else:
        assert r0["cpu"] > 0.3, r0  # it polled the whole time (the core stayed awake)


def test_busy_wait_must_not_be_negative():
    svi = SVI(lambda: None, lambda: None, Adam({"lr": 0.1}), Trace_ELBO())
    with pytest.raises(ValueError, match="busy_wait_ms"):
        DataParallelSVI(svi, busy_wait_ms=-1)


FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "tuned":
        from distsvi.distributed import tune_allocator
        assert tune_allocator()
    x = torch.randn(4096, 100)
    w = torch.randn(100, 256, requires_grad=True)
    v = torch.randn(256, 100, requires_grad=True)
    def step():  # a training step's allocations: activations of a few MiB, then freed
        h = torch.tanh(x @ w)
        ((h @ v) ** 2).sum().backward()
        w.grad = v.grad = None
    for _ in range(60):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(60):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 60)
    """
)


def _faults_per_step(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.timeout(150)
def test_tuned_allocator_stops_steps_page_faulting():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc: nothing to tune")
    untuned = _faults_per_step("untuned")
    if untuned < 100:
        pytest.skip(f"glibc kept this step's memory mapped by itself ({untuned:.0f} faults/step)")
    tuned = _faults_per_step("tuned")
    # The heap still grows now and then while it settles; the churn is gone.
    assert tuned < untuned / 4, f"{tuned:.0f} page faults per step tuned, {untuned:.0f} untuned"


PIN = textwrap.dedent(
    """
    import json, os, sys, torch
    from distsvi.distributed import pin_to_cores
    cores = pin_to_cores(int(sys.argv[1]), int(sys.argv[2]))
    assert sorted(os.sched_getaffinity(0)) == cores, (cores, os.sched_getaffinity(0))
    print(json.dumps([cores, torch.get_num_threads()]))
    """
)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_ranks_of_a_node_get_disjoint_cores():
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs 2 cores")
    got = []
    for rank in (0, 1):
        out = subprocess.run(
            [sys.executable, "-c", PIN, str(rank), "2"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        cores, threads = json.loads(out.stdout)
        got.append(cores)
        assert threads <= len(available) // 2
    assert len(got[0]) == len(got[1]) == len(available) // 2
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) <= set(available)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux")
def test_more_ranks_than_cores_is_refused_before_pinning():
    before = os.sched_getaffinity(0)
    n = len(before) + 1
    with pytest.raises(ValueError, match=f"cannot pin {n} ranks to {len(before)} cores"):
        pin_to_cores(0, n)
    assert os.sched_getaffinity(0) == before

"""How a rank waits for the gradient all-reduce on CPU: it polls for a bounded time, then
blocks; and the allocator setting that keeps a step's buffers mapped."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import dp_workers as w
import pytest
import torch
from dp_harness import assert_same, ok, run_ranks

from distsvi.distributed import DataParallelSVI
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

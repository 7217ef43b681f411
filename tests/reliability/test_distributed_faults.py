"""Faults of a 2-rank job under launch/distsvi-launch (torchrun, Gloo on localhost): a rank
that raises, a restart, data that differs between ranks, a killed launcher, a run after a
finished one. Every process has a timeout; the figures the README's "Failure behaviour"
table quotes are measured here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from reliability_helpers import (
    FAULTY,
    REPO,
    dirs,
    env,
    launch_argv,
    processes_mentioning,
    run_launch,
    small,
    stop,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

TWO = ["--nproc-per-node", "2"]


def test_rank_failure_ends_the_job_in_seconds_whatever_the_timeout(tmp_path):
    """Rank 1 raises at step 50 with dist.timeout_s=600: the job ends within 15 s of the
    fault, exit != 0, the error tagged with the rank on stderr, no ChildFailedError
    traceback, and the launcher names the root cause."""
    marker = tmp_path / "failed_at"
    job = [
        *small(200),
        f"model.name={FAULTY}:raises_on_rank_1",
        f"data.name={FAULTY}:fixed_rows",
        "dist.timeout_s=600",
    ]
    proc = run_launch(
        [*TWO, *job, *dirs(tmp_path)], timeout=240, FAULT_STEP="50", FAULT_MARKER=str(marker)
    )
    ended = time.time()
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert marker.exists(), proc.stderr[-3000:]
    assert ended - float(marker.read_text()) <= 15
    assert "distsvi: rank 1: RuntimeError: injected failure in the model" in proc.stderr
    assert "ChildFailedError" not in proc.stderr
    assert "root cause" in proc.stderr and "injected failure" in proc.stderr.split("root cause")[1]
    # rank 0 sees its peer gone (Gloo's closed connection or, averaging through shared
    # memory, its exited process) and says so in one line, not as an error of its own
    assert "distsvi: rank 0: " not in proc.stderr.replace(
        "distsvi: rank 0: stopping: another rank failed", ""
    ), proc.stderr[-3000:]
    assert not processes_mentioning(str(tmp_path))


def test_max_restarts_still_restarts_after_a_rank_failure(tmp_path):
    """With --max-restarts 1 the failed job restarts, resumes and ends with exit 0."""
    job = [
        *small(60),
        "checkpoint.every=10",
        f"model.name={FAULTY}:raises_once_per_job",
        f"data.name={FAULTY}:fixed_rows",
    ]
    proc = run_launch(
        [*TWO, "--max-restarts", "1", *job, *dirs(tmp_path)],
        timeout=300,
        FAULT_STEP="30",
        FAULT_MARKER=str(tmp_path / "raised"),
    )
    assert (tmp_path / "raised").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected failure in the model" in proc.stderr
    assert "resuming from" in proc.stdout
    assert (tmp_path / "ck" / "step_00000060.pt").is_file()


def test_random_loader_loads_the_same_rows_on_every_rank(tmp_path):
    """A loader drawing with torch.randn (the README's example) gets one data seed: both
    ranks train on identical tensors, and the job ends with exit 0."""
    dump = tmp_path / "dump"
    dump.mkdir()
    job = [*small(10), f"model.name={FAULTY}:logistic", f"data.name={FAULTY}:random_rows"]
    proc = run_launch([*TWO, *job, *dirs(tmp_path)], timeout=240, DATA_DUMP=str(dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert rank0.std() > 0.5  # really random rows, not zeros


def test_rows_that_differ_between_ranks_stop_the_job(tmp_path):
    """A loader that reads the rank loads different rows on each: the fingerprint check
    stops every rank with one message naming the loader and the fix."""
    job = [*small(10), f"model.name={FAULTY}:logistic", f"data.name={FAULTY}:rows_differ_by_rank"]
    start = time.monotonic()
    proc = run_launch([*TWO, *job, *dirs(tmp_path)], timeout=240)
    assert proc.returncode != 0
    assert "rows_differ_by_rank returned different data on rank 0 and rank 1" in proc.stderr
    assert "torch.Generator().manual_seed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "ck").glob("step_*.pt"))
    assert time.monotonic() - start < 120


def test_sigkill_of_the_launcher_takes_its_workers(tmp_path):
    """SIGKILL of launch/distsvi-launch: no worker is alive 5 s later (each dies with its
    parent), so none goes on writing the checkpoint dir."""
    job = [*small(100_000), "checkpoint.every=20", *dirs(tmp_path)]
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen(
            launch_argv([*TWO, *job]), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: (tmp_path / "ck" / "step_00000020.pt").exists(),
                180,
                "the first checkpoint",
                proc,
            )
            workers = [p for p in processes_mentioning(str(tmp_path)) if p != proc.pid]
            assert len(workers) == 2, workers
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            killed = time.monotonic()
            time.sleep(5)
            assert not processes_mentioning(str(tmp_path)), (tmp_path / "launch.log").read_text()
            assert time.monotonic() - killed < 15
        finally:
            stop(proc)
            for pid in processes_mentioning(str(tmp_path)):
                os.kill(pid, signal.SIGKILL)


def test_launcher_after_a_finished_one_process_run(tmp_path):
    """The launcher on the checkpoint dir of a finished one-process run: the world-size
    warning once, and 'nothing to do' with how to train longer or start afresh."""
    from distsvi import cli

    job = [*small(5), *dirs(tmp_path)]
    assert cli.main(["train", *job, "run.progress=none"]) == 0
    proc = run_launch([*TWO, *job], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("was written by 1 ranks, this job has 2") == 1, output
    assert output.count("nothing to do") == 1
    assert "raise run.steps (e.g. run.steps=10)" in output
    assert "checkpoint.resume=never or a new checkpoint.dir" in output


def test_a_full_disk_while_rank_0_saves_ends_the_job(tmp_path):
    """Rank 0's save fails (a file size limit stands for a full disk): it stops with one
    message, leaves no temporary file, and no rank waits for it."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))  # a checkpoint is 13 KB

    job = [*small(40), "checkpoint.every=10", "dist.timeout_s=600", *dirs(tmp_path)]
    start = time.monotonic()
    proc = subprocess.run(
        launch_argv([*TWO, *job]),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        preexec_fn=limit,
    )
    assert proc.returncode != 0
    assert "distsvi: rank 0: cannot write checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "step_00000010.pt" in proc.stderr and "free space" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "ck").glob(".*.tmp"))
    assert not processes_mentioning(str(tmp_path))
    assert time.monotonic() - start < 200

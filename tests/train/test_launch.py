"""The job under the launcher (torchrun, Gloo): 2 processes, resume, crash recovery,
two nodes. One 2-process reference run is shared by the tests that compare with it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import (
    CONFIGS,
    LAUNCH,
    REPO,
    assert_params_close,
    dirs,
    env,
    event_files,
    final_params,
    free_port,
    launch_argv,
    run_launch,
    scalars,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="finds worker processes in /proc"
    ),
]

STEPS = 600
# AutoNormal: Monte-Carlo noise on every rank, so a resumed or restarted run can only
# match if every rank's random stream is restored exactly.
JOB = [
    str(CONFIGS / "quickstart.yaml"),
    f"run.steps={STEPS}",
    "run.log_every=1",
    "run.val_every=100",
    "checkpoint.every=20",
    "checkpoint.keep=3",
    "run.progress=log",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_launch(["--nproc-per-node", "2", *JOB, *dirs(root)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return root


def test_two_processes_one_events_file_and_eval_matches(tmp_path, capsys):
    """Must show 2: exit 0, one events file (rank 0), loss/val == `distsvi eval` in one
    process. AutoDelta makes the validation loss deterministic, so the two can agree."""
    from distsvi import cli

    job = [str(CONFIGS / "quickstart.yaml"), "guide.name=AutoDelta", "run.steps=100"]
    if len(os.sched_getaffinity(0)) >= 2:
        job.append("dist.pin_cpus=true")  # a core of its own per rank: the same numbers
    proc = run_launch(["--nproc-per-node", "2", *job, *dirs(tmp_path)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(event_files(tmp_path / "tb")) == 1
    assert proc.stdout.count("step 100/100 ") == 1  # rank 1 stays quiet
    assert proc.stdout.count("held-out accuracy") == 1
    found = scalars(tmp_path / "tb")
    logged = found["loss/val"][100]
    # AutoDelta's w (30) and b (1), float32, plus the loss and flag that ride along.
    assert found["perf/allreduce_mb"][100] * 2**20 == pytest.approx(4 * 31 + 8)
    assert found["perf/peak_mem_mb"][100] > 50  # torch alone holds more than that
    ck = tmp_path / "ck" / "step_00000100.pt"
    assert cli.main(["eval", job[0], "--checkpoint", str(ck), *job[1:], *dirs(tmp_path)]) == 0
    value = float(capsys.readouterr().out.split()[-1])
    assert value == pytest.approx(logged, rel=1e-5, abs=1e-5)


def test_gloo_averaging_takes_the_shared_memory_runs_steps(reference, tmp_path):
    """dist.shared_memory=false against the reference run, which averages through shared
    memory (the default for ranks of one machine): at 2 ranks both sums are exact, so
    the runs match step for step."""
    proc = run_launch(
        ["--nproc-per-node", "2", *JOB, "dist.shared_memory=false", *dirs(tmp_path)],
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_params_close(final_params(reference / "ck"), final_params(tmp_path / "ck"), atol=0)
    assert scalars(reference / "tb")["loss/train"] == scalars(tmp_path / "tb")["loss/train"]


def test_resume_on_two_ranks(reference, tmp_path):
    """Must show 3, 2 ranks: stopped after 300 steps and started again == uninterrupted."""
    half = STEPS // 2
    first = run_launch(
        ["--nproc-per-node", "2", *JOB, f"run.steps={half}", *dirs(tmp_path)], timeout=180
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_launch(["--nproc-per-node", "2", *JOB, *dirs(tmp_path)], timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ck'}" in second.stdout
    assert_params_close(final_params(reference / "ck"), final_params(tmp_path / "ck"))
    ref, res = scalars(reference / "tb")["loss/train"], scalars(tmp_path / "tb")["loss/train"]
    assert [ref[s] for s in range(half + 1, STEPS + 1)] == [
        res[s] for s in range(half + 1, STEPS + 1)
    ]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launcher that is still running; SIGTERM first, so torchrun stops its workers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _workers(agent_pid: int) -> list[int]:
    """Worker processes started by the torchrun agent (the launcher execs into torchrun)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == agent_pid and b"distsvi.cli" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_crash_recovery_with_max_restarts(reference, tmp_path):
    """Must show 7: SIGKILL one rank mid-run; torchrun restarts, the job resumes from its
    newest checkpoint, exits 0 and ends with the uninterrupted run's params."""
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            launch_argv(["--nproc-per-node", "2", "--max-restarts", "1", *JOB, *dirs(tmp_path)]),
            cwd=REPO,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            first = tmp_path / "ck" / "step_00000040.pt"
            while not first.exists():
                assert proc.poll() is None, "the job stopped before its first checkpoint"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            workers = _workers(proc.pid)
            assert workers, "no worker processes found"
            last = tmp_path / "ck" / f"step_{STEPS:08d}.pt"
            assert not last.exists(), "the run ended before the kill"
            os.kill(max(workers), signal.SIGKILL)
            rc = proc.wait(timeout=180)
        finally:
            _stop(proc)
    output = log_path.read_text()
    assert rc == 0, output[-5000:]
    assert "resuming from" in output, output[-3000:]
    assert_params_close(final_params(reference / "ck"), final_params(tmp_path / "ck"))


def test_two_nodes_on_one_machine(reference, tmp_path):
    """Must show 8: two launchers as two nodes (c10d on 127.0.0.1) == one node, 2 processes."""
    port = free_port()
    node = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"test{port}",
    ]
    procs = [
        subprocess.Popen(
            launch_argv([*node, *JOB, *dirs(tmp_path)]),
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            _stop(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert len(event_files(tmp_path / "tb")) == 1
    assert_params_close(final_params(reference / "ck"), final_params(tmp_path / "ck"))


def _launcher():
    loader = importlib.machinery.SourceFileLoader("distsvi_launch", str(LAUNCH))
    spec = importlib.util.spec_from_loader("distsvi_launch", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["distsvi_launch"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_launcher_builds_torchrun_commands(capsys, monkeypatch):
    launcher = _launcher()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")

    def dry(*args: str) -> str:
        assert launcher.main(["--dry-run", *args, "quickstart", "run.batch_size=8"]) == 0
        return capsys.readouterr().out

    single = dry("--nproc-per-node", "2")
    assert "--standalone" in single and "--nproc-per-node=2" in single
    assert "-m distsvi.cli train quickstart run.batch_size=8" in single
    multi = dry(
        "--nnodes",
        "2",
        "--nproc-per-node",
        "4",
        "--rdzv-endpoint",
        "host:29500",
        "--max-restarts",
        "3",
    )
    assert "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=host:29500" in multi
    assert "--max-restarts=3" in multi and "--standalone" not in multi
    with pytest.raises(SystemExit):
        launcher.main(["--nnodes", "2", "quickstart"])  # no rendezvous endpoint
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_launcher_announces_threads_and_checks_config(capsys, monkeypatch):
    launcher = _launcher()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launcher.main(["--dry-run", "--nproc-per-node", "2", "quickstart", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert launcher.main(["--dry-run", "--nproc-per-node", "2", "quickstart"]) == 0
    assert "OMP_NUM_THREADS=" in capsys.readouterr().err

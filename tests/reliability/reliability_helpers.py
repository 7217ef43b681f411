"""Running the CLI and the launcher for the reliability tests, and finding their processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAUNCH = REPO / "launch" / "distsvi-launch"
FAULTY = HERE / "faulty.py"
DEBUG = REPO / "configs" / "debug.yaml"


def dirs(root: Path) -> list[str]:
    """Overrides that keep a run's checkpoints and events under ``root``."""
    return [f"checkpoint.dir={root / 'ck'}", f"log.dir={root / 'tb'}"]


def small(steps: int = 10) -> list[str]:
    """A tiny, quiet job: the debug config with few steps and one save at the end."""
    return [
        str(DEBUG),
        f"run.steps={steps}",
        "run.log_every=5",
        "run.val_every=1000",
        "checkpoint.every=0",
        "checkpoint.resume=auto",
        "predict.num_samples=5",
    ]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        e.pop(k, None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def run_cli(args: list[str], timeout: float, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distsvi.cli", *args],
        cwd=REPO,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def launch_argv(args: list[str]) -> list[str]:
    return [sys.executable, str(LAUNCH), *args]


def run_launch(args: list[str], timeout: float, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_argv(args),
        cwd=REPO,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z" and text.encode() in cmdline and int(stat.parent.name) != os.getpid():
            found.append(int(stat.parent.name))
    return found


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from the TensorBoard event files in ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out

"""Shared helpers for the training-job tests: running the CLI and the launcher, reading
TensorBoard events and checkpoints back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
LAUNCH = REPO / "launch" / "distsvi-launch"


def dirs(root: Path) -> list[str]:
    """Overrides that keep a run's checkpoints and events under ``root``."""
    return [f"checkpoint.dir={root / 'ck'}", f"log.dir={root / 'tb'}"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_cli(args: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distsvi.cli", *args],
        cwd=cwd,
        env=env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_argv(args: list[str]) -> list[str]:
    return [sys.executable, str(LAUNCH), *args]


def run_launch(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_argv(args),
        cwd=REPO,
        env=env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("events.out.tfevents.*"))


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file in ``logdir`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in event_files(logdir):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def text_tags(logdir: Path) -> set[str]:
    """Tags of the text summaries (``add_text``) in ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in event_files(logdir):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags.update(acc.Tags()["tensors"])
    return tags


def final_params(ckdir: Path) -> dict[str, torch.Tensor]:
    files = sorted(ckdir.glob("step_*.pt"))
    return torch.load(files[-1], weights_only=True)["params"]


def assert_params_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], atol=atol, rtol=0, msg=f"param {k} differs")

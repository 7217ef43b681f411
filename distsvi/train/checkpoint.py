"""Checkpoints that exist whole or not at all, and resuming from the newest good one.

A checkpoint is one file ``step_00000100.pt`` holding only tensors and plain containers,
so it loads with ``torch.load(weights_only=True)`` (no pickled code runs on load):

============  ==============================================================
``format``    1
``step``      steps completed; ``epoch`` and ``data_position`` say where the
              data iterator stands
``seed``      the run seed; ``rng`` holds every rank's generator states as
              uint8 tensors (``torch``: ``[world_size, n]``; ``cuda`` likewise)
``params``    the param store, unconstrained values by name
``buffers``   module buffers by ``module$$$buffer`` name
``optim``     optimizer (and scheduler) state keyed by param name
``config``    the resolved config as YAML text; ``world_size``
============  ==============================================================
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
REQUIRED = (
    "format",
    "step",
    "epoch",
    "data_position",
    "seed",
    "rng",
    "params",
    "optim",
    "config",
    "world_size",
)


class CheckpointWarning(UserWarning):
    """A checkpoint file was skipped because it does not load."""


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load(path: str | Path) -> dict[str, Any]:
    """Load and check one checkpoint file.

    :raises ValueError: when it does not load or lacks a key (naming the file).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways; all mean "skip it"
        raise ValueError(f"checkpoint {path} does not load: {type(e).__name__}: {e}") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    if state["format"] != FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {state['format']}, this version reads {FORMAT}"
        )
    return state


class Checkpointer:
    """Saves every ``every`` steps and at the end, keeps the newest ``keep``, finds the newest good one.

    :param directory: where ``step_*.pt`` files live.
    :param every: save period in steps (0: only at the end).
    :param keep: how many of the newest files to keep.
    :param is_writer: only the main rank writes; the others call :meth:`save` harmlessly.
    """

    def __init__(self, directory: str | Path, every: int, keep: int, is_writer: bool) -> None:
        self.dir, self.every, self.keep, self.is_writer = Path(directory), every, keep, is_writer

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` atomically, then drop files beyond the newest ``keep``."""
        if not self.is_writer:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(state["step"])
        save_atomic(state, path)
        for old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; each one that does not is skipped with a warning."""
        for path in self.files():
            try:
                return load(path), path
            except ValueError as e:
                warnings.warn(
                    f"skipping bad checkpoint {path}: {e}", CheckpointWarning, stacklevel=2
                )
        return None

"""What a job's process holds outside itself: its tie to the launcher, and the lock on
its checkpoint directory. Torch-free.

- A worker started by torchrun dies with it (Linux ``PR_SET_PDEATHSIG``): a launcher
  killed with SIGKILL cannot stop its workers itself, and orphaned workers would go on
  writing the checkpoint directory next to the re-run's.
- One job at a time writes a checkpoint directory: the writing rank holds an ``flock`` on
  ``checkpoint.dir/.lock``, which holds the holder's host and pid. The kernel drops the
  lock when its process dies, so a lock file left by a dead process is taken over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path

from distsvi.train.errors import ConfigError

_PR_SET_PDEATHSIG = 1
LOCK_NAME = ".lock"


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    :returns: whether the request was made.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: act on it now
        os.kill(os.getpid(), sig)
    return True


class DirLock:
    """An exclusive lock on ``directory`` for this process (see the module docstring).

    :raises ConfigError: naming the holder (host, pid) when another live process holds it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                "checkpoint.dir",
                f"{str(self.path.parent)!r} is in use by a running job ({holder}); wait for "
                "it to end, stop it, or give this job another checkpoint.dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays for the next holder
            self.fd = None

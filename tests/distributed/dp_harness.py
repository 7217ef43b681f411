"""Run a function on 2 real Gloo ranks on localhost, with a deadline so a hang fails.

Each rank runs in a fresh process (forked from a clean server process) with the torchrun environment set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port) and one
thread. What the function returns comes back to the test; an exception comes back as
:class:`RankError` so a test can check that every rank raised.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp


@dataclass
class RankError:
    """An exception raised on a rank: its type name, message and traceback."""

    type: str
    message: str
    traceback: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    backend: str,
    dtype: torch.dtype,
    args: tuple,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)
    import distsvi
    import distsvi.distributed as dd

    distsvi.clear_param_store()
    group = dd.init(backend=backend)
    torch.set_default_device(group.device)
    try:
        result: Any = fn(group, *args)
    except Exception as e:  # noqa: BLE001 (returned to the test, which checks it)
        result = RankError(type(e).__name__, str(e), traceback.format_exc())
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if isinstance(result, RankError):
        # No barrier: the other rank may be stuck in a collective, which this unblocks.
        torch.distributed.destroy_process_group()
    else:
        dd.shutdown()


# Ranks fork from a server that has imported these once, instead of importing torch anew.
mp.set_forkserver_preload(["torch", "torch.distributed", "distsvi", "distsvi.distributed"])


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 90.0,
    backend: str = "gloo",
    dtype: torch.dtype = torch.float32,
) -> list[Any]:
    """Run ``fn(group, *args)`` on ``world_size`` ranks; return each rank's result.

    ``fn`` must be a module-level function (it is pickled by name). The test fails if the
    ranks are not all done within ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, backend, dtype, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"ranks did not finish within {timeout} s (a hang?)")
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), map_location="cpu", weights_only=False)
            for r in range(world_size)
        ]


def ok(results: list[Any]) -> list[Any]:
    """Fail the test with the rank's traceback if any rank raised."""
    failed = [
        f"rank {rank} raised {r.type}: {r.message}\n{r.traceback}"
        for rank, r in enumerate(results)
        if isinstance(r, RankError)
    ]
    if failed:
        pytest.fail("\n".join(failed))
    return results


def assert_same(a, b, path="") -> None:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{path} differs: {a} vs {b}"
    else:
        assert a == b, f"{path} differs: {a} vs {b}"

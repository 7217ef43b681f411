"""The same script as one process and under torchrun (2 Gloo ranks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dp_script.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _run(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, *argv], check=False, env=env, capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_world_size_1_gives_the_plain_svi_result_bit_for_bit():
    wrapped = _run(str(SCRIPT))
    plain = _run(str(SCRIPT), "--plain")
    assert wrapped.startswith("world_size=1 ")
    assert wrapped == plain


def test_torchrun_two_ranks():
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT))
    lines = [line for line in out.splitlines() if line.startswith("world_size=")]
    assert len(lines) == 1, out  # rank 0 alone prints
    match = re.fullmatch(r"world_size=2 loss=(\S+) full_loss=(\S+) params=[0-9a-f]{16}", lines[0])
    assert match, lines[0]
    assert 0 < float(match[2]) < 1024 * 0.7  # below the loss of a coin flip per datapoint

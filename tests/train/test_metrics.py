"""Rank 0 writes TensorBoard events and shows progress; other ranks stay silent."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import event_files, scalars

from distsvi.train.metrics import NullMetrics, Progress, TensorBoardMetrics, make_metrics

VALUES = {"loss/train": 1.5, "perf/samples_per_s": 100.0, "perf/step_ms": 2.0, "optim/lr": 0.1}


def test_only_the_main_rank_writes_events(tmp_path):
    other = make_metrics(False, str(tmp_path / "other"))
    assert isinstance(other, NullMetrics) and not isinstance(other, TensorBoardMetrics)
    other.scalars(1, VALUES)
    other.close()
    assert not (tmp_path / "other").exists()
    main = make_metrics(True, str(tmp_path / "main"))
    main.scalars(3, VALUES)
    main.text("config", "name: x")
    main.close()
    assert len(event_files(tmp_path / "main")) == 1
    assert scalars(tmp_path / "main")["loss/train"] == {3: 1.5}


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress("auto", is_main=True, total=10, initial=0)
    assert bar.mode == "bar"
    bar.update(5, VALUES)
    bar.close()
    assert "5/10" in terminal.getvalue()

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = Progress("auto", is_main=True, total=10, initial=0)
    assert lines.mode == "log"
    lines.update(5, VALUES)
    assert capsys.readouterr().out.startswith("step 5/10 loss 1.5")

    quiet = Progress("auto", is_main=False, total=10, initial=0)
    quiet.update(5, VALUES)
    quiet.message("only rank 0 speaks")
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_resets_to_the_memory_in_use():
    """perf/peak_mem_mb leaves data loading out: a freed 400 MB buffer's peak is forgotten."""
    from distsvi.train.metrics import peak_memory_mb, reset_peak_memory

    big = torch.ones(100_000_000)  # 400 MB, touched
    high = peak_memory_mb()
    del big
    reset_peak_memory()
    assert peak_memory_mb() < high - 300

"""Models and data loaders that fail on purpose, for the reliability tests.

Each reads what it needs from the environment (``RANK`` under torchrun, and
``FAULT_STEP``), so one file serves every test; a config names them as
``faulty.py:NAME``.
"""

from __future__ import annotations

import os
import time

import torch

import distsvi
import distsvi.distributions as dist

_calls = {"n": 0}


def _logistic(x, y, size, subsample_size, subsample):
    w = distsvi.sample("w", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
    with distsvi.plate("data", size, subsample_size=subsample_size, subsample=subsample) as idx:
        if subsample is None:
            x = x[idx]
            y = None if y is None else y[idx]
        return distsvi.sample("obs", dist.Bernoulli(logits=x @ w), obs=y)


def _step() -> int:
    _calls["n"] += 1
    return _calls["n"]


def raises_on_rank_1(x, y=None, *, size, subsample_size=None, subsample=None):
    """Raises on rank 1 at its ``FAULT_STEP``-th call (about that training step)."""
    if os.environ.get("RANK") == "1" and _step() == int(os.environ.get("FAULT_STEP", "50")):
        if "FAULT_MARKER" in os.environ:  # when it failed, for the time-to-end figure
            with open(os.environ["FAULT_MARKER"], "w") as f:
                f.write(repr(time.time()))
        raise RuntimeError("injected failure in the model")
    return _logistic(x, y, size, subsample_size, subsample)


def raises_once_per_job(x, y=None, *, size, subsample_size=None, subsample=None):
    """Rank 1 raises once, at its ``FAULT_STEP``-th call, in the first attempt only (a
    marker file ``FAULT_MARKER`` remembers it), so a restarted job finishes."""
    marker = os.environ["FAULT_MARKER"]
    if (
        os.environ.get("RANK") == "1"
        and _step() == int(os.environ.get("FAULT_STEP", "30"))
        and not os.path.exists(marker)
    ):
        open(marker, "w").close()
        raise RuntimeError("injected failure in the model")
    return _logistic(x, y, size, subsample_size, subsample)


def nan_steps(x, y=None, *, size, subsample_size=None, subsample=None):
    """A non-finite log-prob at a site named ``bad`` on calls FAULT_STEP .. FAULT_STEP +
    FAULT_LEN - 1 (FAULT_LEN 0: from FAULT_STEP on)."""
    n = _step()
    start, length = int(os.environ.get("FAULT_STEP", "5")), int(os.environ.get("FAULT_LEN", "0"))
    bad = n >= start and (length == 0 or n < start + length)
    out = _logistic(x, y, size, subsample_size, subsample)
    distsvi.factor("bad", x.new_tensor(float("nan") if bad else 0.0))
    return out


def random_rows(n: int = 400, features: int = 5):
    """The README's own loader: draws with torch.randn from the global generator."""
    x = torch.randn(n, features)
    if "DATA_DUMP" in os.environ:  # what this rank loaded, for the test to compare
        torch.save(
            x, os.path.join(os.environ["DATA_DUMP"], f"rank{os.environ.get('RANK', '0')}.pt")
        )
    return x, (x.sum(-1) > 0).float()


def rows_differ_by_rank(n: int = 400, features: int = 5):
    """Reads the rank: each rank loads different rows, which no seed can fix."""
    gen = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    x = torch.randn(n, features, generator=gen)
    return x, (x.sum(-1) > 0).float()


def fixed_rows(n: int = 400, features: int = 5):
    """Fixed rows; ``FEATURES`` stands for a data file edited between two runs."""
    features = int(os.environ.get("FEATURES", features))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=gen)
    return x, (x.sum(-1) > 0).float()


def logistic(x, y=None, *, size, subsample_size=None, subsample=None):
    return _logistic(x, y, size, subsample_size, subsample)


def wrong_signature(x):
    """A model the trainer cannot call (no size / subsample keywords)."""
    return x

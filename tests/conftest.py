"""Shared test fixtures: every test starts from fresh param stores and a fixed seed."""

import sys

import pytest
import torch

# Test tensors are tiny: a second intra-op thread only adds contention on a 2-core machine.
torch.set_num_threads(1)


def _clear_stores() -> None:
    import distsvi

    distsvi.clear_param_store()
    pyro = sys.modules.get("pyro")  # never import pyro here: parity tests do, when installed
    if pyro is not None:
        pyro.clear_param_store()


@pytest.fixture(autouse=True)
def fresh_param_stores():
    """Clear distsvi's (and, when loaded, Pyro's) global param store around each test."""
    _clear_stores()
    torch.manual_seed(0)
    yield
    _clear_stores()

"""Shared test fixtures: every test starts from fresh param stores and a fixed seed."""

import importlib.util

import pytest
import torch

_HAVE_PYRO = importlib.util.find_spec("pyro") is not None


def _clear_stores() -> None:
    import distsvi

    distsvi.clear_param_store()
    if _HAVE_PYRO:
        import pyro

        pyro.clear_param_store()


@pytest.fixture(autouse=True)
def fresh_param_stores():
    """Clear distsvi's (and, when installed, Pyro's) global param store around each test."""
    _clear_stores()
    torch.manual_seed(0)
    yield
    _clear_stores()

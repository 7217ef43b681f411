import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    """Parity is checked in double precision so that 1e-5 relative measures the engine,
    not float32 summation order."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

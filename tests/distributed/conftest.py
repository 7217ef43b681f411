import pytest
import torch

BACKENDS = [
    "gloo",
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(
            torch.cuda.device_count() < 2, reason="NCCL runs one rank per GPU: needs 2 GPUs"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each multi-rank test runs on Gloo (CPU), and on NCCL where 2 GPUs exist."""
    return request.param


@pytest.fixture
def float64():
    """Reference runs in double precision, as the ranks do, so tolerances measure the
    reduction and not float32 summation order."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

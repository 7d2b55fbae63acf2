import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_rng():
    """Each test starts from the same global random state."""
    torch.manual_seed(1234)
    yield

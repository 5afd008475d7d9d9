from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Graph tests compare our kernels with their references on random inputs: the same inputs each run."""
    import torch

    torch.manual_seed(0)

"""Kernel tests run on a CUDA GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (i.e. before
``llava_edge.kernels.*`` is imported), which is why it is set here, at conftest import time.
"""

from __future__ import annotations

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # test modules skip themselves via importorskip
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)

"""Kernel tests run on a CUDA GPU when there is one, else in Triton's CPU interpreter (set up by the root
conftest, before any kernel module is imported)."""

from __future__ import annotations

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # test modules skip themselves via importorskip
    _HAS_CUDA = False

import pytest


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"


# bf16 only on a GPU: the interpreter's bf16 is broken (numpy has no bfloat16).
_DTYPES = ["float32", "float16"] + (["bfloat16"] if _HAS_CUDA else [])


@pytest.fixture(params=_DTYPES, ids=lambda n: {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[n])
def dtype(request):
    """Every kernel test that takes ``dtype`` runs in each dtype the kernels support here."""
    import torch

    return getattr(torch, request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)

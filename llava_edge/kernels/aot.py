"""A Triton kernel compiled ahead of time for one GPU target: its PTX and launch facts.

The TensorRT stage compiles our kernels into these and hands them to TensorRT as AOT plugins
(``plugins.py`` of the TensorRT stage); ``resources.py`` reads what one costs the GPU. Here, beside the
kernels, so the kernels never import the TensorRT stage.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AotKernel"]


@dataclass(frozen=True)
class AotKernel:
    """A kernel compiled for one GPU target (``cc``, e.g. 87): what ``aot_impl`` hands to TensorRT."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    cc: int = 0

"""What a compiled kernel costs the GPU in registers, spills and shared memory, read without a GPU.

Why: a kernel that spills registers to local memory, or needs more shared memory than the target has,
is slow or does not launch, and that is decided at compile time, not at run time. Triton compiles for
a named target on any machine, and ``ptxas -v`` (shipped inside Triton) reports what the PTX costs.
So the configurations we ship can be checked for Orin (sm_87) and Hopper (sm_90) in CPU CI, and a
tuning choice (warps, tile sizes) can be justified before a GPU is at hand. Timing still needs one.

The PTX assembled here is exactly the one handed to TensorRT (after ``drop_hidden_params``), so this
also shows that what TensorRT receives assembles for the target.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from .aot import AotKernel

__all__ = ["KernelResources", "resource_usage", "REGISTERS_PER_SM", "MAX_SHARED_PER_BLOCK"]

REGISTERS_PER_SM = 65536  # sm_80 .. sm_90
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class KernelResources:
    """``ptxas -v`` figures for one kernel on one target (per thread unless it says otherwise)."""

    name: str
    cc: int
    num_warps: int
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int  # per block: Triton's dynamic shared memory (the static part is ~0)

    @property
    def blocks_per_sm_by_registers(self) -> int:
        """Resident blocks an SM can hold by register count alone (registers go in units of 256 per warp)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        return REGISTERS_PER_SM // (per_warp * self.num_warps)

    def fits_shared(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_PER_BLOCK.get(self.cc, 48 * 1024)


def resource_usage(kernel: AotKernel) -> KernelResources:
    """Assemble ``kernel.ptx`` for its target with Triton's ptxas and read the ``-v`` report.

    Raises ``RuntimeError`` with ptxas's message when the PTX does not assemble.
    """
    target = re.search(r"^\s*\.target\s+(sm_\w+)", kernel.ptx, re.M)
    if target is None:
        raise ValueError(f"{kernel.name}: no .target in the PTX")
    ptxas = _ptxas_path(kernel.cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(kernel.ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={target.group(1)}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=120)
    if run.returncode:
        raise RuntimeError(f"ptxas rejected {kernel.name} for {target.group(1)}: {run.stderr.strip()[-2000:]}")
    report = run.stderr + run.stdout

    def num(pattern: str) -> int:
        m = re.search(pattern, report)
        return int(m.group(1)) if m else 0

    return KernelResources(
        name=kernel.name, cc=kernel.cc, num_warps=kernel.num_warps,
        registers=num(r"Used (\d+) registers"),
        stack_bytes=num(r"(\d+) bytes stack frame"),
        spill_store_bytes=num(r"(\d+) bytes spill stores"),
        spill_load_bytes=num(r"(\d+) bytes spill loads"),
        shared_bytes=kernel.shared_mem + num(r"(\d+) bytes smem"),
    )


def _ptxas_path(cc: int) -> str:
    """The ptxas Triton itself uses for ``cc``. Its helper changed shape across Triton releases:
    ``get_ptxas(arch)`` returning a tool with ``.path`` (3.4+), the same returning ``(path, version)``,
    or ``get_ptxas()`` without the arch (older)."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    fn = nv.get_ptxas
    tool = fn(cc) if inspect.signature(fn).parameters else fn()
    return tool.path if hasattr(tool, "path") else tool[0]

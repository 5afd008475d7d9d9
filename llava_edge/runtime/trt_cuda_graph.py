"""CUDA graph capture of a TensorRT execution context's decode step, one graph per batch size.

A decode step of a small model is hundreds of short kernels, cheaper to launch as one graph. Valid when
shapes and addresses are the same every step (in-place and plugin layouts at T = 1); input copies and
the KV scatter stay outside the graph. Capture follows the TensorRT guide ("CUDA Graphs": one plain run,
then begin/execute/end capture); any failure is logged and the runner falls back to plain
``execute_async_v3``. See docs/architecture.md.
"""

from __future__ import annotations

import logging
from typing import Any

from .backend import BackendError

__all__ = ["CudaGraphRunner"]

log = logging.getLogger(__name__)


class _CaptureFailed(Exception):
    pass


class CudaGraphRunner:
    """Runs a TensorRT context on a stream, from a captured graph per ``key`` when enabled."""

    def __init__(self, cudart: Any, context: Any, stream: int, name: str = "decoder", enabled: bool = True):
        self.cudart, self.context, self.stream, self.name = cudart, context, stream, name
        self.enabled = enabled
        self.disabled_reason: str | None = None if enabled else "disabled (cuda_graphs=False)"
        self.graphs: dict[Any, tuple[Any, Any]] = {}  # key -> (graph, graph exec)
        self.captures = 0
        self.launches = 0

    def execute(self) -> None:
        """Plain ``execute_async_v3`` (not captured)."""
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run the {self.name} engine (see the TensorRT log above)")

    def run(self, key: Any) -> None:
        """One step with the context's current shapes/addresses, which must be the same every time
        ``key`` is used. The first call for a key runs plainly and captures for the next ones."""
        if not self.enabled:
            self.execute()
            return
        if key in self.graphs:
            err = self.cudart.cudaGraphLaunch(self.graphs[key][1], self.stream)
            if int(_err(err)) != 0:
                raise BackendError(f"cudaGraphLaunch of the {self.name} decode graph failed: CUDA error {_err(err)}")
            self.launches += 1
            return
        self.execute()  # the documented warm-up run before capture, and this step's result
        try:
            self.graphs[key] = self._capture()
            self.captures += 1
        except _CaptureFailed as e:
            self.disable(str(e))

    def disable(self, reason: str) -> None:
        log.warning("CUDA graph capture of the %s step failed, running it without CUDA graphs: %s", self.name, reason)
        self.enabled, self.disabled_reason = False, reason
        self.close()

    def _capture(self) -> tuple[Any, Any]:
        rt = self.cudart
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        err = _err(rt.cudaStreamBeginCapture(self.stream, mode))
        if int(err) != 0:
            raise _CaptureFailed(f"cudaStreamBeginCapture: CUDA error {err}")
        ok, raised = False, None
        try:
            ok = bool(self.context.execute_async_v3(self.stream))
        except Exception as e:  # noqa: BLE001 - the capture must be ended whatever happened
            raised = e
        err, graph = rt.cudaStreamEndCapture(self.stream)  # always: leaves the stream out of capture mode
        if raised is not None or not ok or int(err) != 0:
            if graph is not None and int(err) == 0:
                rt.cudaGraphDestroy(graph)
            why = raised or ("execute_async_v3 returned False" if not ok else f"CUDA error {err}")
            raise _CaptureFailed(f"capturing execute_async_v3: {why}")
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            rt.cudaGraphDestroy(graph)
            raise _CaptureFailed(f"cudaGraphInstantiate: CUDA error {err}")
        return graph, graph_exec

    def close(self) -> None:
        """Destroy every captured graph (before the buffers they point at are freed)."""
        for graph, graph_exec in self.graphs.values():
            self.cudart.cudaGraphExecDestroy(graph_exec)
            self.cudart.cudaGraphDestroy(graph)
        self.graphs = {}


def _err(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result

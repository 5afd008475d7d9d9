"""Run a graph with our plugin nodes on CPU: ``onnx.reference.ReferenceEvaluator`` with the plugin ops
implemented by the Triton kernels (``impl="triton"``; under ``TRITON_INTERPRET=1`` without a GPU) or by
their torch references (``impl="reference"``).

Why: no TensorRT is available to execute the plugin-attention decoder (trt/plugin_decoder.py), and
onnxruntime cannot run ``trt.plugins`` nodes; this checks that the graph around the plugins (reshapes,
I/O order, attributes, aliasing) computes the same logits as the portable graph.

Aliasing is real: the caches and split-K scratch arrive as the caller's numpy arrays, the kernel
updates them in place through ``torch.from_numpy`` views, and the aliased outputs are the very same
arrays, so a caller that feeds one buffer per layer sees it updated exactly as a TensorRT engine with
aliased plugin I/O would leave it. Feeds must therefore be writable, C-contiguous arrays.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..contract import ONNX_DOMAIN

__all__ = ["plugin_ops", "PluginGraphRunner"]

Impl = Literal["triton", "reference"]


def _t(a: np.ndarray):
    import torch

    if not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError("plugin state (caches, scratch) must be a writable C-contiguous array: it is updated in place")
    return torch.from_numpy(a)


def _c(a: np.ndarray):
    """A torch copy of a read-only input (initializers such as the rotary tables are not writable)."""
    import torch

    return torch.from_numpy(np.array(a, order="C"))


def _prefill(impl: Impl, q, k, v, prompt_lens, start_pos, cos, sin, k_cache, v_cache, block_m, block_n, sm_scale):
    args = (_c(q), _c(k), _c(v), _t(k_cache), _t(v_cache), _c(prompt_lens), _c(cos), _c(sin))
    start = _c(start_pos)
    if impl == "triton":
        from .prefill_attention import prefill_attention

        out = prefill_attention(*args, start_pos=start, sm_scale=sm_scale, block_m=block_m, block_n=block_n)
    else:
        from .reference import prefill_attention_ref

        out = prefill_attention_ref(*args, start_pos=start, sm_scale=sm_scale)
    return out.numpy()


def _decode(impl: Impl, q, k, v, seq_lens, cos, sin, k_cache, v_cache, partial_o, partial_ml, counters,
            num_splits, block_n, sm_scale):
    args = (_c(q), _c(k), _c(v), _t(k_cache), _t(v_cache), _c(seq_lens), _c(cos), _c(sin))
    if impl == "triton":
        from .decode_attention import DecodeWorkspace, decode_attention

        ws = DecodeWorkspace(_t(partial_o), _t(partial_ml), _t(counters))
        out = decode_attention(*args, sm_scale=sm_scale, num_splits=num_splits, block_n=block_n, workspace=ws)
    else:
        from .reference import decode_attention_ref

        out = decode_attention_ref(*args, sm_scale=sm_scale)
    return out.numpy()


def plugin_ops(impl: Impl = "triton") -> list[type]:
    """``OpRun`` classes for ``trt.plugins::{prefill_attention, decode_attention}`` (pass as ``new_ops``)."""
    from onnx.reference.op_run import OpRun

    if impl not in ("triton", "reference"):
        raise ValueError(f"impl must be 'triton' or 'reference', not {impl!r}")

    def prefill_run(self, q, k, v, prompt_lens, start_pos, cos, sin, k_cache, v_cache, **attrs: Any):
        out = _prefill(impl, q, k, v, prompt_lens, start_pos, cos, sin, k_cache, v_cache,
                       int(self.block_m), int(self.block_n), float(self.sm_scale))
        return out, k_cache, v_cache  # aliased outputs: the same (updated) buffers

    def decode_run(self, q, k, v, seq_lens, cos, sin, k_cache, v_cache, partial_o, partial_ml, counters,
                   **attrs: Any):
        out = _decode(impl, q, k, v, seq_lens, cos, sin, k_cache, v_cache, partial_o, partial_ml, counters,
                      int(self.num_splits), int(self.block_n), float(self.sm_scale))
        return out, k_cache, v_cache, partial_o, partial_ml, counters

    return [type("prefill_attention", (OpRun,), {"op_domain": ONNX_DOMAIN, "_run": prefill_run}),
            type("decode_attention", (OpRun,), {"op_domain": ONNX_DOMAIN, "_run": decode_run})]


class PluginGraphRunner:
    """``run(feeds) -> {name: array}`` for a plugin graph; caches in ``feeds`` are updated in place."""

    def __init__(self, model, impl: Impl = "triton"):
        from onnx.reference import ReferenceEvaluator

        self.impl = impl
        self._ev = ReferenceEvaluator(model, new_ops=plugin_ops(impl))
        self.output_names = list(self._ev.output_names)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._ev.run(None, feeds)))

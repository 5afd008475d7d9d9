"""OpenVINO runs the prompt's prefill of the fast decoder graph; onnxruntime keeps vision, embedding and decode.

Why two runtimes for one graph: on CPU, OpenVINO computes a long prompt chunk through the package's own
int4 fast decoder (MatMulNBits, RotaryEmbedding, GroupQueryAttention) faster than onnxruntime does (a 640-
position prompt on edge-1b, 2 threads: 2.9 s against 5.1 s; a server's 16-token chunk: 104 against 130
ms), while its decode step is slower (85 against 46 ms) and it refuses a batched decode with rows of
different lengths. So each runtime does what it does best on the same graph file, and the KV cache stays
onnxruntime's in-place buffer (fast_backend.py): OpenVINO reads the slot's row of that buffer as its past
and returns ``present`` sized to the filled length (its GroupQueryAttention does not write in place), and
the new positions are copied into the row.

The rule for which runtime takes a chunk depends only on the chunk's length (``min_tokens``), and chunk
boundaries depend only on the prompt (scheduler.py), so a sequence runs the same calls alone as in a
crowd and greedy tokens do not change with the load. Chunks of a few tokens (a prompt's short tail, what
a reused prefix leaves) stay on onnxruntime, which is as fast or faster there.

Cost: OpenVINO holds its own copy of the decoder's weights, read from the ONNX file and repacked for its
kernels, and compiles the graph at every open (about 2 s on edge-1b): ``llava-edge bench``'s peak RSS
on edge-1b int4 is 2569 MiB against onnxruntime alone's 1230 MiB. That is why it is a backend you choose
(``ort-fast-ov``, ``ort-fast-int4-ov``) and not the default. Neither of OpenVINO's ways to skip the
ONNX read works for this graph in openvino 2026.4.1: a decoder loaded from its compiled-model cache
(``CACHE_DIR``) gave other logits than the one compiled from the file (the tests' second open caught
it), and an IR saved with ``save_model`` does not load ("Cannot create GroupQueryAttention layer ...
from unsupported opset: extension").

Precision: f32 is asked for explicitly. On a CPU with bf16 units OpenVINO would otherwise run an fp32
graph in bf16, and the logits would no longer be those of the graph onnxruntime runs.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from .backend import BackendError

# Prompt chunks of at least this many tokens go to OpenVINO. Measured on edge-1b int4, 2 threads, after a
# 100-token context, runtimes interleaved, 9 rounds (ms per chunk, onnxruntime / OpenVINO): 1: 37 / 51,
# 4: 54 / 53, 8: 78 / 73, 16: 130 / 104, 32: 221 / 182, 64: 464 / 333, 256: 1923 / 1214, 640: 5097 / 2920
# (benchmarks/openvino/prefill_chunks.py; docs/cpu.md, "OpenVINO prefill").
OV_MIN_PREFILL_TOKENS = 8


class PrefillEngine(str, Enum):
    """Which runtime runs the fast backend's long prompt chunks (decode is always onnxruntime's)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


def import_openvino() -> Any:
    """The openvino module, or one BackendError naming the extra that installs it (it is optional)."""
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"OpenVINO prefill needs the openvino extra: pip install 'llava-edge[openvino]' ({e}); "
                           "or use --backend ort-fast-int4 (onnxruntime alone)") from None
    return openvino


class OpenVinoPrefill:
    """The fast decoder graph compiled by OpenVINO for CPU, writing prompt chunks into FastKVCache rows."""

    def __init__(self, graph: Path, threads: int | None, past_names: list[str], present_names: list[str],
                 min_tokens: int = OV_MIN_PREFILL_TOKENS):
        ov = import_openvino()
        core = ov.Core()
        # Read the graph's weights instead of mapping them: mapped, the file's pages stay resident beside
        # the compiled (repacked) copy. edge-1b int4: peak 1.41 against 1.95 GB, prefill time the same.
        core.set_property({"ENABLE_MMAP": False})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(str(graph), "CPU", config)
        except RuntimeError as e:
            raise BackendError(f"OpenVINO {ov.__version__} could not compile {graph.name}: {str(e)[:400]}") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = {i.get_any_name() for i in self.compiled.inputs}
        self.past_names = past_names
        self.presents = [self.compiled.output(n) for n in present_names]
        self.logits = self.compiled.output("logits")
        self.min_tokens = min_tokens
        self.version = ov.__version__

    def takes(self, tokens: int) -> bool:
        """Whether a chunk of ``tokens`` goes to OpenVINO (by its length only: see the module docstring)."""
        return tokens >= self.min_tokens

    def prefill(self, buffers: list[np.ndarray], slot: int, old: int, embeds: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        """Append ``embeds`` [1, T, H] after the ``old`` positions of ``slot``'s row of ``buffers`` (keys and
        values of each layer, in the graph's past order); logits of the last token [V]."""
        t = embeds.shape[1]
        feeds: dict[str, np.ndarray] = {
            "inputs_embeds": embeds, "seqlens_k": np.array([old + t - 1], np.int32),
            "total_sequence_length": np.array(old + t, np.int32), "logits_index": np.array([t - 1], np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.ascontiguousarray(positions.reshape(1, t), dtype=np.int64)
        for name, buf in zip(self.past_names, buffers):
            feeds[name] = buf[slot : slot + 1]  # the whole row (contiguous); seqlens_k says how much is filled
        result = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        for out, buf in zip(self.presents, buffers):
            present = result[out]
            if present.shape[2] != old + t:
                raise BackendError(f"OpenVINO returned {present.shape[2]} cache positions, expected {old + t} "
                                   f"(openvino {self.version}; use --backend ort-fast-int4)")
            buf[slot, :, old : old + t] = present[0, :, old : old + t]
        return np.array(result[self.logits][0], dtype=np.float32)

"""The static-cache decoder graph for TensorRT: the whole fixed-length KV cache in, this step's k/v out.

The portable graph with its outputs changed (``present.*`` become internal, the new k/v become
``new.{i}.key/value``), so its math is ``graphs.Decoder``'s with no second implementation, and decode
shapes and addresses stay fixed (one cache buffer, CUDA-graph capturable). The reasoning and the costs
are in docs/architecture.md ("The engine contract").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from onnx import helper

from ..onnx_io import MAX_IR_VERSION

__all__ = ["STATIC_OUTPUT_PREFIX", "StaticDecoderError", "static_decoder_io_names", "make_static_decoder",
           "write_static_decoder", "write_derived_decoder"]

STATIC_OUTPUT_PREFIX = "new"


class StaticDecoderError(Exception):
    """The decoder graph does not have the portable layout this derivation expects."""


def static_decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    new = [f"{STATIC_OUTPUT_PREFIX}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *new]


def make_static_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the portable decoder with ``new.{i}.key/value`` outputs instead of ``present.*``.

    ``model`` may be loaded without its external data (``load_external_data=False``): initializers
    keep their references, and the result is saved next to the same data file. Raises
    :class:`StaticDecoderError` if a ``present`` output is not ``Concat(past, new, axis=2)``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    outputs = [o for o in g.output if o.name.startswith("present.")]
    if not outputs:
        raise StaticDecoderError("the decoder has no present.* outputs: not the portable decoder graph")
    renames: dict[str, str] = {}
    new_outputs: list[onnx.ValueInfoProto] = []
    for o in outputs:
        _, layer, kv = o.name.split(".")
        node = producer.get(o.name)
        past = f"past_key_values.{layer}.{kv}"
        axis = next((a.i for a in node.attribute if a.name == "axis"), None) if node is not None else None
        if (node is None or node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != past
                or axis not in (2, -2)):
            raise StaticDecoderError(f"{o.name} is not Concat({past}, new, axis=2); cannot derive the static-cache "
                                     "decoder from this graph")
        name = f"{STATIC_OUTPUT_PREFIX}.{layer}.{kv}"
        if node.input[1] in renames or node.input[1] in {i.name for i in g.input}:
            raise StaticDecoderError(f"{o.name}: the new k/v tensor {node.input[1]} is shared or a graph input")
        renames[node.input[1]] = name
        dims = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        shape = [dims[0], dims[1], "seq", dims[3]] if len(dims) == 4 else None
        new_outputs.append(helper.make_tensor_value_info(name, o.type.tensor_type.elem_type, shape))
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
        for i, n in enumerate(node.output):
            if n in renames:
                node.output[i] = renames[n]
    for vi in list(g.value_info):
        if vi.name in renames:
            g.value_info.remove(vi)
    keep = [o for o in g.output if not o.name.startswith("present.")]
    del g.output[:]
    g.output.extend(keep + new_outputs)
    out.ir_version = min(out.ir_version, MAX_IR_VERSION)
    return out


def write_derived_decoder(decoder_path: str | Path, out_path: str | Path,
                          derive: Callable[[onnx.ModelProto], onnx.ModelProto],
                          error: type[Exception] = StaticDecoderError) -> Path:
    """Load ``decoder_path`` without its weights, ``derive`` a variant graph and save it as ``out_path``.

    ``out_path`` must be in the same directory as the decoder: its weights stay where they are (the
    external data file, if the decoder has one, is referenced, not copied; an inline decoder, < 1 GB
    by the exporter's rule, is copied inline). Shared by the static-cache and plugin-attention variants."""
    src, dst = Path(decoder_path), Path(out_path)
    if src.resolve().parent != dst.resolve().parent:
        raise error(f"{dst} must be next to {src} (it shares the decoder's external data)")
    model = onnx.load(str(src), load_external_data=False)
    onnx.save_model(derive(model), str(dst))
    return dst


def write_static_decoder(decoder_path: str | Path, out_path: str | Path) -> Path:
    """Derive the static-cache graph of ``decoder_path`` and save it as ``out_path``, next to it."""
    return write_derived_decoder(decoder_path, out_path, make_static_decoder)

"""The plugin-attention decoder graph for TensorRT >= 10.9: each layer's attention is one of our AOT Triton
plugin nodes (``trt.plugins.plugin_node``) with the KV cache as input and aliased output. Derived from
the package's own ``decoder.onnx`` (every dtype the builder accepts, no checkpoint needed): the q/k/v
projections feed the plugin, whose output replaces the input of ``o_proj``; the portable attention
becomes dead and is removed. Kinds ``"prefill"`` (one engine for prefill chunks and decode steps, what
the builder uses) and ``"decode"`` (split-K, built and verified, not selected). I/O and the reasoning
are in docs/architecture.md ("The engine contract").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import ONNX_DOMAIN
from ..onnx_io import MAX_IR_VERSION
from .plugins import plugin_node
from .static_decoder import write_derived_decoder

__all__ = ["PluginDecoderConfig", "PluginDecoderError", "plugin_decoder_io_names", "make_plugin_decoder",
           "write_plugin_decoder", "SCRATCH"]

SCRATCH = ("decode.partial_o", "decode.partial_ml", "decode.counters")
Kind = Literal["prefill", "decode"]


class PluginDecoderError(Exception):
    """The decoder graph (or the model's shape) does not allow the plugin-attention derivation."""


@dataclass(frozen=True)
class PluginDecoderConfig:
    """Plugin attributes baked into the graph (AOT: they become kernel constexprs at build time)."""

    kind: Kind = "prefill"
    max_positions: int = 4096  # rows of the rotary tables: >= the engine's max context
    block_m: int = 64  # prefill query block
    block_n: int = 64  # key block (both kernels)
    num_splits: int = 4  # decode split-K factor (power of two); scratch is [B, H, num_splits, D]


def plugin_decoder_io_names(num_layers: int, kind: Kind = "prefill") -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    if kind == "prefill":
        return ["inputs_embeds", "prompt_lens", "start_pos", *past], ["logits", *present]
    return (["inputs_embeds", "seq_lens", *past, *SCRATCH],
            ["logits", *present, *(f"{s}_out" for s in SCRATCH)])


# ----------------------------------------------------------------------------------------- helpers
def _const_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _rotary_tables(model: onnx.ModelProto, head_dim: int, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 cos/sin [max_pos, D/2] from the portable graph's rotary: Cos(Concat(f, f)) with
    f = positions * inv_freq, then * attention_scaling (transformers' LlamaRotaryEmbedding, traced)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    cos = next((n for n in model.graph.node if n.op_type == "Cos"), None)
    cat = producer.get(cos.input[0]) if cos is not None else None
    mul = producer.get(cat.input[0]) if cat is not None and cat.op_type == "Concat" else None
    inv_freq = None
    if mul is not None and mul.op_type == "Mul":
        for name in mul.input:
            c = _const_value(model, name)
            if c is not None and c.size == head_dim // 2:
                inv_freq = c.astype(np.float32).reshape(-1)
    if inv_freq is None:
        raise PluginDecoderError("cannot find the rotary frequencies (Cos(Concat(positions * inv_freq))) in the "
                                 "decoder graph")
    scaling = 1.0
    for n in consumers.get(cos.output[0], []):
        if n.op_type == "Mul":
            other = n.input[1] if n.input[0] == cos.output[0] else n.input[0]
            c = _const_value(model, other)
            if c is not None and c.size == 1:
                scaling = float(c.reshape(-1)[0])
    freqs = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :]  # fp32 products, as torch
    return ((np.cos(freqs) * np.float32(scaling)).astype(np.float32),
            (np.sin(freqs) * np.float32(scaling)).astype(np.float32))


def _find_matmul(nodes: list[onnx.NodeProto], layer: int, proj: str) -> onnx.NodeProto:
    name = f"/layers.{layer}/{proj}/MatMul"
    weights = {f"layers.{layer}.{proj}.weight_t", f"layers.{layer}.{proj}.weight_t_dq"}
    hit = [n for n in nodes
           if n.op_type == "MatMul" and (n.name == name or (len(n.input) > 1 and n.input[1] in weights))]
    if len(hit) != 1:
        raise PluginDecoderError(f"expected one MatMul for layers.{layer}.{proj}, found {len(hit)}: not the "
                                 "portable decoder layout")
    return hit[0]


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes nothing consumes (the replaced attention, mask and position glue) and unused initializers."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs read outer names implicitly
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for sn in g.node for i in sn.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# ------------------------------------------------------------------------------------- derivation
def make_plugin_decoder(model: onnx.ModelProto, num_heads: int, num_kv_heads: int, head_dim: int,
                        cfg: PluginDecoderConfig = PluginDecoderConfig()) -> onnx.ModelProto:
    """A copy of the portable decoder with plugin attention (see the module docstring).

    ``model`` may be loaded without external data (weights keep their references). Raises
    :class:`PluginDecoderError` when the graph is not the portable layout or the kernels cannot take the
    model (head_dim must be a power of two >= 32, heads a multiple of kv heads)."""
    if head_dim < 32 or head_dim & (head_dim - 1):
        raise PluginDecoderError(f"head_dim {head_dim}: the attention kernels need a power of two >= 32")
    if num_heads % num_kv_heads:
        raise PluginDecoderError(f"{num_heads} heads are not a multiple of {num_kv_heads} kv heads")
    if cfg.kind not in ("prefill", "decode"):
        raise PluginDecoderError(f"kind must be 'prefill' or 'decode', not {cfg.kind!r}")
    if cfg.num_splits < 1 or cfg.num_splits & (cfg.num_splits - 1):
        raise PluginDecoderError(f"num_splits must be a power of two, got {cfg.num_splits}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inputs = {i.name: i for i in g.input}
    pasts = sorted((n for n in inputs if n.startswith("past_key_values.")), key=lambda s: (int(s.split(".")[1]), s))
    num_layers = len(pasts) // 2
    if not num_layers or "inputs_embeds" not in inputs:
        raise PluginDecoderError("the decoder has no past_key_values.* inputs: not the portable decoder graph")
    cache_type = inputs[pasts[0]].type.tensor_type.elem_type
    cos, sin = _rotary_tables(model, head_dim, cfg.max_positions)
    decode = cfg.kind == "decode"
    scale = float(head_dim ** -0.5)

    consts = [numpy_helper.from_array(cos, "plugin.rotary.cos"), numpy_helper.from_array(sin, "plugin.rotary.sin")]
    shapes = {"q": [0, num_heads, head_dim] if decode else [0, 0, num_heads, head_dim],
              "kv": [0, num_kv_heads, head_dim] if decode else [0, 0, num_kv_heads, head_dim],
              "out": [0, 1, num_heads * head_dim] if decode else [0, 0, num_heads * head_dim]}
    for k, v in shapes.items():
        consts.append(numpy_helper.from_array(np.array(v, np.int64), f"plugin.shape.{k}"))
    g.initializer.extend(consts)

    # the portable graph's present.* producers (Concat(past, new)) give way to the plugin's aliased outputs
    nodes = [n for n in g.node if not any(o.startswith("present.") for o in n.output)]
    scratch = list(SCRATCH)
    for i in range(num_layers):
        q, k, v, o = (_find_matmul(nodes, i, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        pre = f"/layers.{i}/plugin_attention"
        new = [helper.make_node("Reshape", [q.output[0], "plugin.shape.q"], [f"{pre}/q"], name=f"{pre}/ReshapeQ"),
               helper.make_node("Reshape", [k.output[0], "plugin.shape.kv"], [f"{pre}/k"], name=f"{pre}/ReshapeK"),
               helper.make_node("Reshape", [v.output[0], "plugin.shape.kv"], [f"{pre}/v"], name=f"{pre}/ReshapeV")]
        caches = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        presents = [f"present.{i}.key", f"present.{i}.value"]
        qkv = [f"{pre}/q", f"{pre}/k", f"{pre}/v"]
        if decode:
            last = i == num_layers - 1
            scratch_out = [f"{s}_out" if last else f"{pre}/{s.split('.')[1]}_out" for s in SCRATCH]
            new.append(plugin_node("decode_attention", [*qkv, "seq_lens", "plugin.rotary.cos", "plugin.rotary.sin",
                                                        *caches, *scratch], [f"{pre}/out", *presents, *scratch_out],
                                   name=f"{pre}/decode_attention", num_splits=cfg.num_splits, block_n=cfg.block_n,
                                   sm_scale=scale))
            scratch = scratch_out
        else:
            new.append(plugin_node("prefill_attention", [*qkv, "prompt_lens", "start_pos", "plugin.rotary.cos",
                                                         "plugin.rotary.sin", *caches], [f"{pre}/out", *presents],
                                   name=f"{pre}/prefill_attention", block_m=cfg.block_m, block_n=cfg.block_n,
                                   sm_scale=scale))
        new.append(helper.make_node("Reshape", [f"{pre}/out", "plugin.shape.out"], [f"{pre}/out_flat"],
                                    name=f"{pre}/ReshapeOut"))
        o.input[0] = f"{pre}/out_flat"
        at = nodes.index(o)
        nodes[at:at] = new

    del g.node[:]
    g.node.extend(nodes)
    # I/O
    embeds = inputs["inputs_embeds"]
    e_type = embeds.type.tensor_type.elem_type
    hidden = embeds.type.tensor_type.shape.dim[2].dim_value or "hidden"
    cache_shape = ["batch", num_kv_heads, "max_ctx", head_dim]
    new_inputs = [helper.make_tensor_value_info("inputs_embeds", e_type, ["batch", 1 if decode else "seq", hidden])]
    if decode:
        new_inputs.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["batch"]))
    else:
        new_inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch"])
                       for n in ("prompt_lens", "start_pos")]
    new_inputs += [helper.make_tensor_value_info(p, cache_type, cache_shape) for p in pasts]
    logits = next(o for o in g.output if o.name == "logits")
    new_outputs = [logits] + [helper.make_tensor_value_info(p.replace("past_key_values.", "present."), cache_type,
                                                            cache_shape) for p in pasts]
    if decode:
        sc = [(SCRATCH[0], TensorProto.FLOAT, ["batch", num_heads, cfg.num_splits, head_dim]),
              (SCRATCH[1], TensorProto.FLOAT, ["batch", num_heads, cfg.num_splits, 2]),
              (SCRATCH[2], TensorProto.INT32, ["batch", num_kv_heads])]
        new_inputs += [helper.make_tensor_value_info(n, t, s) for n, t, s in sc]
        new_outputs += [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in sc]
    del g.input[:]
    g.input.extend(new_inputs)
    del g.output[:]
    g.output.extend(new_outputs)
    del g.value_info[:]
    _prune(g)
    used = {i for n in g.node for i in n.input}
    stale = used & {"attention_mask", "position_ids"}
    if stale:
        raise PluginDecoderError(f"after replacing attention the graph still reads {sorted(stale)}: not the "
                                 "portable decoder layout")
    if not any(n.domain == ONNX_DOMAIN for n in g.node):
        raise PluginDecoderError("no plugin node was inserted")
    if not any(o.domain == ONNX_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(ONNX_DOMAIN, 1))
    out.ir_version = min(out.ir_version, MAX_IR_VERSION)
    return out


def write_plugin_decoder(decoder_path: str | Path, out_path: str | Path, num_heads: int, num_kv_heads: int,
                         head_dim: int, cfg: PluginDecoderConfig = PluginDecoderConfig()) -> Path:
    """Derive the plugin graph of ``decoder_path`` and save it as ``out_path``, next to the decoder (its
    external weights are referenced, not copied)."""
    return write_derived_decoder(decoder_path, out_path,
                                 lambda m: make_plugin_decoder(m, num_heads, num_kv_heads, head_dim, cfg),
                                 PluginDecoderError)

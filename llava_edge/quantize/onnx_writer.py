"""Put quantized Linears into the exported decoder graph, in one of two executable forms.

* ``matmulnbits``: ORT's ``com.microsoft.MatMulNBits`` (A, B uint8 [N, K/g, g*bits/8], scales).
  No zero-point input (the default ``2^(bits-1)`` is our symmetric code offset) and no g_idx, which
  is what lets ORT prepack B once at session creation. The fastest CPU/CUDA path in onnxruntime.
* ``qdq``: standard ONNX ``DequantizeLinear`` (opset 21, blocked along K: ``axis=0``,
  ``block_size=g``, zero point omitted = 0) on an INT4/INT8 initializer [K, N], feeding the original
  ``MatMul``. Portable: TensorRT builds weight-only int4 GEMMs from this pattern, and any ONNX
  runtime can execute it. Raising the graph to opset 21 uses onnx's version converter (needed
  because e.g. ReduceMean changed signature in opset 18).

Both forms carry the same codes and scales, so they compute the same function up to float
accumulation order; ``tests/calibration`` checks that in onnxruntime.

Weights are located by initializer name (``layers.{i}.q_proj.weight_t`` ..., the exporter's
contract), not by node position, and any quantized Linear that is not found is an error. The fast
decoder stacks q/k/v (``layers.{i}.qkv_proj.weight_t``) and gate/up (``layers.{i}.mlp.gate_up_proj``)
into one weight each; their quantized parts are stacked the same way (``FUSED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnx_io import EXTERNAL_DATA_THRESHOLD, MAX_IR_VERSION, save_onnx
from ..packing import QuantizedLinear, concat_outputs, pack_int4_onnx
from .options import QuantFormat

FORMATS = tuple(f.value for f in QuantFormat)  # "matmulnbits", "qdq"
# Fused weights of the fast decoder (export/fast_decoder.py): name suffix -> the Linears stacked in it.
FUSED = {".qkv_proj": (".q_proj", ".k_proj", ".v_proj"), ".mlp.gate_up_proj": (".mlp.gate_proj", ".mlp.up_proj")}
QDQ_OPSET = 21
_NP_FLOAT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


class OnnxWriteError(Exception):
    pass


@dataclass
class WriteResult:
    path: Path
    external_data: list[str]
    replaced: list[str]  # canonical names of the Linears now quantized in the graph


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _load(src: Path, need_opset: int | None) -> onnx.ModelProto:
    model = onnx.load(str(src), load_external_data=False)
    if need_opset is not None and _default_opset(model) < need_opset:
        # Convert before loading the weights: the converter round-trips the proto through a
        # string, which must stay under protobuf's 2 GB.
        from onnx import version_converter

        ir = model.ir_version
        model = version_converter.convert_version(model, need_opset)
        model.ir_version = ir
    onnx.load_external_data_for_model(model, str(src.parent))
    return model


def _matmulnbits_nodes(node: onnx.NodeProto, key: str, q: QuantizedLinear, act: str, np_dtype) -> tuple[list, list]:
    n, k = q.shape
    g = q.group_size
    b = q.pack().reshape(n, k // g, g * q.bits // 8)
    inits = [
        numpy_helper.from_array(b, f"{key}.qweight"),
        numpy_helper.from_array(q.scales.cpu().numpy().astype(np_dtype).reshape(-1), f"{key}.scales"),
    ]
    new = helper.make_node(
        "MatMulNBits", [act, f"{key}.qweight", f"{key}.scales"], list(node.output),
        name=node.name[: -len("MatMul")] + "MatMulNBits" if node.name.endswith("MatMul") else node.name + "_nbits",
        domain="com.microsoft", K=k, N=n, bits=q.bits, block_size=g,
    )
    return [new], inits


def _qdq_nodes(node: onnx.NodeProto, key: str, q: QuantizedLinear, act: str, np_dtype) -> tuple[list, list]:
    n, k = q.shape
    codes_kn = q.q.cpu().numpy().astype(np.int8).T  # [K, N]: MatMul's B orientation
    if q.bits == 4:
        wq = helper.make_tensor(f"{key}.weight_t_q", TensorProto.INT4, [k, n], pack_int4_onnx(codes_kn), raw=True)
    else:
        wq = numpy_helper.from_array(np.ascontiguousarray(codes_kn), f"{key}.weight_t_q")
    scales = numpy_helper.from_array(np.ascontiguousarray(q.scales.cpu().numpy().astype(np_dtype).T),
                                     f"{key}.weight_t_scale")
    base = node.name[: -len("/MatMul")] if node.name.endswith("/MatMul") else node.name
    dq = helper.make_node(
        "DequantizeLinear", [wq.name, scales.name], [f"{key}.weight_t_dq"], name=f"{base}/DequantizeLinear",
        axis=0, block_size=q.group_size,
    )
    mm = helper.make_node("MatMul", [act, f"{key}.weight_t_dq"], list(node.output), name=node.name)
    return [dq, mm], [wq, scales]


def write_quantized_decoder(
    src: str | Path,
    dst: str | Path,
    quantized: dict[str, QuantizedLinear],
    fmt: str = "matmulnbits",
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
    check: bool = True,
) -> WriteResult:
    """Read ``src`` decoder.onnx, replace each ``{key}.weight_t`` MatMul by its quantized form,
    write ``dst`` (+ ``dst.data`` when large) and check it with onnx.checker."""
    if fmt not in FORMATS:
        raise OnnxWriteError(f"unknown format {fmt!r}; use one of {FORMATS}")
    src, dst = Path(src), Path(dst)
    model = _load(src, QDQ_OPSET if fmt == "qdq" else None)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    replaced: list[str] = []
    targets = {f"{key}.weight_t": (key, [key]) for key in quantized}
    for suffix, part_suffixes in FUSED.items():  # the fast decoder's fused q/k/v and gate/up
        for key in quantized:
            if key.endswith(part_suffixes[0]):
                prefix = key[: -len(part_suffixes[0])]
                parts = [prefix + p for p in part_suffixes]
                if all(p in quantized for p in parts):
                    targets[f"{prefix}{suffix}.weight_t"] = (prefix + suffix, parts)
    for node in graph.node:
        target = targets.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if target is None:
            new_nodes.append(node)
            continue
        key, parts = target
        q = quantized[key] if parts == [key] else concat_outputs([quantized[p] for p in parts])
        init = inits[node.input[1]]
        if list(init.dims) != [q.shape[1], q.shape[0]]:
            raise OnnxWriteError(f"{init.name} is {list(init.dims)} in the graph but the quantized weight is "
                                 f"[{q.shape[1]}, {q.shape[0]}] (transposed); wrong checkpoint for this package?")
        if init.data_type not in _NP_FLOAT:
            raise OnnxWriteError(f"{init.name}: unsupported weight dtype {TensorProto.DataType.Name(init.data_type)}")
        if len(consumers[init.name]) != 1:
            raise OnnxWriteError(f"{init.name} is shared by several nodes (tied weights?); cannot replace it")
        np_dtype = _NP_FLOAT[init.data_type]
        act = node.input[0]
        if q.perm is not None:
            # Act-order import that could not be folded: gather the input channels once.
            perm_name = f"{key}.input_perm"
            new_inits.append(numpy_helper.from_array(q.perm.cpu().numpy().astype(np.int64), perm_name))
            new_nodes.append(helper.make_node("Gather", [act, perm_name], [f"{key}.input_permuted"],
                                              name=f"{node.name}_input_perm", axis=-1))
            act = f"{key}.input_permuted"
        build = _matmulnbits_nodes if fmt == "matmulnbits" else _qdq_nodes
        nodes, extra = build(node, key, q, act, np_dtype)
        new_nodes.extend(nodes)
        new_inits.extend(extra)
        drop.add(init.name)
        replaced.extend(parts)

    missing = sorted(set(quantized) - set(replaced))
    if missing:
        raise OnnxWriteError(f"no MatMul reads {missing[0]}.weight_t in {src.name} "
                             f"({len(missing)} quantized Linears unmatched); not a llava-edge decoder graph?")
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if fmt == "matmulnbits" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)

    size = sum(_tensor_bytes(i) for i in graph.initializer)
    external = save_onnx(model, dst, external=size > external_threshold)
    if check:  # the fast decoder holds onnxruntime-internal ops the checker does not know
        onnx.checker.check_model(str(dst))
    return WriteResult(dst, external, replaced)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.raw_data else int(np.prod(t.dims)) * 4

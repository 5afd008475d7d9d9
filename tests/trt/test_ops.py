"""The exported graphs against the TensorRT ONNX op table, and the checker's rules on synthetic graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llava_edge.trt import ops as trt_ops
from llava_edge.trt.plugins import plugin_node


@pytest.mark.parametrize("graph", ["vision", "embed", "decoder"])
@pytest.mark.parametrize("version", [(10, 3), (10, 15), (11, 0)])
def test_exported_graphs_import_on_every_supported_trt(trt_package, graph, version):
    check = trt_ops.check_onnx_file(trt_package / f"{graph}.onnx", graph, version)
    assert check.ok, check.describe()
    assert set(check.op_counts) <= trt_ops.supported_ops(version)
    assert sum(check.op_counts.values()) > 0


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, dtype=TensorProto.FLOAT, shape=(1, 4)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def test_version_gated_ops():
    att = _model([helper.make_node("Attention", ["q", "k", "v"], ["y"])], [_vi("q"), _vi("k"), _vi("v")], [_vi("y")],
                 opset=23)
    bad = trt_ops.check_model(att, "decoder", (10, 3))
    assert not bad.ok and "needs TensorRT >= 10.14" in bad.describe()
    assert trt_ops.check_model(att, "decoder", (10, 14)).ok
    rope = _model([helper.make_node("RotaryEmbedding", ["x", "c", "s"], ["y"])], [_vi("x"), _vi("c"), _vi("s")],
                  [_vi("y")], opset=23)
    assert not trt_ops.check_model(rope, "d", (10, 14)).ok
    assert trt_ops.check_model(rope, "d", (10, 15)).ok
    with pytest.raises(ValueError, match="needs >= 10.0"):
        trt_ops.supported_ops((8, 6))


def test_unknown_and_contrib_ops_are_errors():
    m = _model([helper.make_node("MatMulNBits", ["x", "w"], ["y"], domain="com.microsoft"),
                helper.make_node("StringNormalizer", ["y"], ["z"])],
               [_vi("x"), _vi("w")], [_vi("z")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    check = trt_ops.check_model(m, "decoder", (10, 15))
    text = check.describe()
    assert len(check.errors) == 2 and "--format qdq" in text and "StringNormalizer" in text


def _dq(x_type, x_dims, scale_dims, block=None, zp=None):
    inits = [helper.make_tensor("w", x_type, x_dims, np.zeros(int(np.prod(x_dims)), dtype=np.int64).tolist()),
             numpy_helper.from_array(np.ones(scale_dims, np.float16), "s")]
    ins = ["w", "s"]
    if zp is not None:
        inits.append(helper.make_tensor("zp", x_type, scale_dims, [zp] * int(np.prod(scale_dims))))
        ins.append("zp")
    attrs = {"axis": 0}
    if block:
        attrs["block_size"] = block
    node = helper.make_node("DequantizeLinear", ins, ["wd"], **attrs)
    mm = helper.make_node("MatMul", ["x", "wd"], ["y"])
    return _model([node, mm], [_vi("x", TensorProto.FLOAT16, (1, 64))], [_vi("y", TensorProto.FLOAT16, (1, 8))],
                  inits, opset=21)


def test_int4_dequantize_rules():
    ok = trt_ops.check_model(_dq(TensorProto.INT4, (64, 8), (2, 8), block=32), "decoder", (10, 3))
    assert ok.ok, ok.describe()
    assert ok.issues and ok.issues[0].severity == "warning"  # opset 21 > documented 20 for 10.0-10.14
    assert trt_ops.check_model(_dq(TensorProto.INT4, (64, 8), (2, 8), block=32, zp=0), "d", (10, 3)).ok
    asym = trt_ops.check_model(_dq(TensorProto.INT4, (64, 8), (2, 8), block=32, zp=3), "d", (10, 3))
    assert "zero point" in asym.describe()
    per_channel = trt_ops.check_model(_dq(TensorProto.INT4, (64, 8), (8,)), "d", (10, 15))
    assert "block-quantized with a 2-D scale" in per_channel.describe()
    int8_block = trt_ops.check_model(_dq(TensorProto.INT8, (64, 8), (2, 8), block=32), "d", (10, 15))
    assert "INT4 only" in int8_block.describe()
    uint4 = trt_ops.check_model(_dq(TensorProto.UINT4, (64, 8), (2, 8), block=32), "d", (10, 15))
    assert "signed INT4" in uint4.describe()


def test_fp8_refused_on_targets_without_it():
    m = _dq(TensorProto.FLOAT8E4M3FN, (64, 8), (8,))
    assert "no FP8" in trt_ops.check_model(m, "d", (10, 15), fp8=False).describe()
    assert trt_ops.check_model(m, "d", (10, 15), fp8=True).ok


def test_plugin_nodes_follow_the_aot_gate():
    node = plugin_node("int4_matmul", ["x", "qw", "sc"], ["y"], group_size=128)
    m = _model([node], [_vi("x"), _vi("qw"), _vi("sc")], [_vi("y")],
               extra_opsets=[helper.make_opsetid("trt.plugins", 1)])
    old = trt_ops.check_model(m, "decoder", (10, 3))
    assert not old.ok and "needs TensorRT >= 10.9" in old.describe()
    new = trt_ops.check_model(m, "decoder", (10, 9))
    assert new.ok and new.plugins == ["int4_matmul"]
    assert not trt_ops.check_model(m, "decoder", (10, 9), plugins_allowed=False).ok


def test_subgraph_nodes_are_checked():
    then = helper.make_graph([helper.make_node("StringNormalizer", ["a"], ["b"])], "then", [], [_vi("b")])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["b2"])], "else", [], [_vi("b2")])
    m = _model([helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=other)],
               [_vi("c", TensorProto.BOOL, (1,)), _vi("a")], [_vi("o")])
    assert "StringNormalizer" in trt_ops.check_model(m, "g", (10, 15)).describe()


def test_double_graph_io_refused():
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", TensorProto.DOUBLE)],
               [_vi("y", TensorProto.DOUBLE)])
    assert "DOUBLE" in trt_ops.check_model(m, "g", (10, 15)).describe()


def test_table_is_consistent():
    assert not set(trt_ops.VERSION_GATED) & trt_ops.SUPPORTED_OPS
    assert "MatMul" in trt_ops.SUPPORTED_OPS and "LayerNormalization" in trt_ops.SUPPORTED_OPS
    assert trt_ops.max_opset((10, 3)) == 20 and trt_ops.max_opset((10, 15)) == 24
    onnx.checker.check_model(_dq(TensorProto.INT4, (64, 8), (2, 8), block=32))  # our synthetic graphs are valid ONNX

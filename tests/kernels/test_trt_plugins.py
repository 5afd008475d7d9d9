"""TensorRT integration that can be checked without TensorRT: the version policy, the ONNX node form,
the lazy import, and AOT compilation of every kernel to PTX for Orin (sm_87) and Hopper (sm_90) with
exactly the parameter list the plugins declare."""

from __future__ import annotations

import importlib.util

import pytest

from llava_edge.kernels import trt_plugins as tp


@pytest.mark.parametrize(
    "version,prefer_native,expected",
    [
        ((10, 3), False, "standard"),  # JetPack 6: no Python plugins
        ((10, 3), True, "standard"),
        ((10, 8, 0, 43), False, "standard"),  # JIT-only Python plugins: would need Python at run time
        ((10, 9), False, "plugin"),
        ((10, 14, 1), True, "plugin"),  # ONNX Attention import exists but has no KV cache
        ((10, 15), False, "plugin"),
        ((10, 15), True, "trt-attention"),
        ((11, 0), True, "trt-attention"),
        ((11,), False, "plugin"),
    ],
)
def test_attention_impl_for(version, prefer_native, expected) -> None:
    assert tp.attention_impl_for(version, prefer_native=prefer_native) == expected


def test_parse_trt_version() -> None:
    assert tp.parse_trt_version("10.3.0.30") == (10, 3, 0, 30)
    assert tp.parse_trt_version("10.9.0.post12.dev1") == (10, 9, 0)
    assert tp.attention_impl_for(tp.parse_trt_version("10.3.0.30")) == "standard"
    with pytest.raises(ValueError):
        tp.parse_trt_version("dev")


def test_plugin_node_form() -> None:
    onnx = pytest.importorskip("onnx")
    ins, outs = tp.PLUGIN_IO["decode_attention"]
    node = tp.plugin_node("decode_attention", [f"l0.{n}" for n in ins], [f"l0.{n}" for n in outs],
                          name="layer0_attn", num_splits=8, block_n=64, sm_scale=0.088)
    assert node.op_type == "decode_attention"  # op_type is the plugin *name*, no namespace
    assert node.domain == tp.ONNX_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"llava_edge"
    assert attrs["aot"] == 1 and node.attribute[[a.name for a in node.attribute].index("aot")].type == onnx.AttributeProto.INT
    assert attrs["num_splits"] == 8 and abs(attrs["sm_scale"] - 0.088) < 1e-7
    assert list(node.input)[6] == "l0.k_cache" and list(node.output)[1] == "l0.k_cache_out"
    with pytest.raises(ValueError, match="takes inputs"):
        tp.plugin_node("prefill_attention", ["q"], ["out"])
    with pytest.raises(ValueError, match="unknown plugin"):
        tp.plugin_node("flash_attention", [], [])


def test_plugin_node_graph_passes_onnx_checker() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    ins, outs = tp.PLUGIN_IO["int4_matmul"]
    node = tp.plugin_node("int4_matmul", list(ins), list(outs), group_size=128)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 256]),
         helper.make_tensor_value_info("qweight", TensorProto.UINT8, [64, 128]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT16, [64, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(tp.ONNX_DOMAIN, 1)])
    onnx.checker.check_model(model)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_register_plugins_without_tensorrt_says_what_to_do() -> None:
    with pytest.raises(ImportError, match="standard"):
        tp.register_plugins()


_AOT_SCRIPT = """
from llava_edge.kernels import trt_plugins as tp
for cc in (87, 90):
    kernels = [
        tp.compile_decode_attention("float16", head_dim=128, group=1, num_splits=8, cc=cc),  # LLaVA-7B
        tp.compile_decode_attention("float16", head_dim=128, group=4, num_splits=1, cc=cc),
        tp.compile_prefill_attention("float16", head_dim=128, group=1, cc=cc),
        tp.compile_int4_matmul("float16", 128, "gemv", block_n=32, cc=cc),
        tp.compile_int4_matmul("float16", 128, "gemm", cc=cc),
    ]
    for k in kernels:
        assert f".entry {k.name}" in k.ptx and f".target sm_{cc}" in k.ptx, k.name
        assert k.num_warps >= 1 and k.shared_mem < 160 * 1024, (k.name, k.shared_mem)  # fits Orin (sm_87)
print("aot ok")
"""


def test_kernels_compile_ahead_of_time() -> None:
    """Every plugin's kernel compiles to PTX for sm_87 and sm_90 with the declared signature. Runs in a
    fresh interpreter because TRITON_INTERPRET (set for this process) replaces kernels by Python."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "aot ok" in run.stdout, run.stderr[-3000:]


def test_aot_refuses_interpreted_kernels() -> None:
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are real JIT functions in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tp.compile_int4_matmul("float16", 128, "gemv", cc=90)

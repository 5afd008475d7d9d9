"""TensorRT integration that can be checked without TensorRT: the version policy, the ONNX node form,
the lazy import, and AOT compilation of every kernel to PTX for Orin (sm_87) and Hopper (sm_90) with
exactly the parameter list the plugins declare."""

from __future__ import annotations

import importlib.util

import pytest

from llava_edge import contract
from llava_edge.trt import plugins as tp


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
    assert contract.attention_impl_for(version, prefer_native=prefer_native) == expected


def test_parse_trt_version() -> None:
    assert contract.parse_trt_version("10.3.0.30") == (10, 3, 0, 30)
    assert contract.parse_trt_version("10.9.0.post12.dev1") == (10, 9, 0)
    assert contract.attention_impl_for(contract.parse_trt_version("10.3.0.30")) == "standard"
    with pytest.raises(ValueError):
        contract.parse_trt_version("dev")


def test_plugin_node_form() -> None:
    onnx = pytest.importorskip("onnx")
    ins, outs = contract.PLUGIN_IO["decode_attention"]
    node = tp.plugin_node("decode_attention", [f"l0.{n}" for n in ins], [f"l0.{n}" for n in outs],
                          name="layer0_attn", num_splits=8, block_n=64, sm_scale=0.088)
    assert node.op_type == "decode_attention"  # op_type is the plugin *name*, no namespace
    assert node.domain == contract.ONNX_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"llava_edge"
    assert attrs["aot"] == 1
    assert node.attribute[[a.name for a in node.attribute].index("aot")].type == onnx.AttributeProto.INT
    assert attrs["num_splits"] == 8 and abs(attrs["sm_scale"] - 0.088) < 1e-7
    assert list(node.input)[6] == "l0.k_cache" and list(node.output)[1] == "l0.k_cache_out"
    with pytest.raises(ValueError, match="takes inputs"):
        tp.plugin_node("prefill_attention", ["q"], ["out"])
    with pytest.raises(ValueError, match="unknown plugin"):
        tp.plugin_node("flash_attention", [], [])


def test_plugin_node_graph_passes_onnx_checker() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    ins, outs = contract.PLUGIN_IO["int4_matmul"]
    node = tp.plugin_node("int4_matmul", list(ins), list(outs), group_size=128)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 256]),
         helper.make_tensor_value_info("qweight", TensorProto.UINT8, [64, 128]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT16, [64, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(contract.ONNX_DOMAIN, 1)])
    onnx.checker.check_model(model)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_register_plugins_without_tensorrt_says_what_to_do() -> None:
    with pytest.raises(ImportError, match="standard"):
        tp.register_plugins()


_AOT_SCRIPT = """
import re
from llava_edge import contract
from llava_edge.trt import plugins as tp
from llava_edge.kernels.resources import resource_usage
# spill budget per thread, bytes: decode spills 8 B outside its loop; prefill's 64x64 tile at
# head_dim 128 with rotary in registers still spills ~150-230 B with 8 warps (1.3-1.5 KB with 4).
SPILLS = {"_decode_attention_kernel": 16, "_prefill_attention_kernel": 256, "_int4_gemv_kernel": 0,
          "_int4_gemm_kernel": 0}
for cc in (87, 90):
    kernels = [  # the configurations the plugins build, at LLaVA-7B shapes
        (tp.compile_decode_attention("float16", head_dim=128, group=1, num_splits=8, cc=cc), "decode_attention", 2),
        (tp.compile_decode_attention("float16", head_dim=128, group=4, num_splits=1, cc=cc), "decode_attention", 2),
        (tp.compile_prefill_attention("float16", head_dim=128, group=1, cc=cc), "prefill_attention", 3),
        (tp.compile_int4_matmul("float16", 128, "gemv", cc=cc), "int4_matmul", 3),
        (tp.compile_int4_matmul("float16", 128, "gemm", cc=cc), "int4_matmul", 4),
    ]
    for k, plugin, scalars in kernels:
        assert f".entry {k.name}" in k.ptx and f".target sm_{cc}" in k.ptx, k.name
        entry = k.ptx[k.ptx.index(".entry"):]
        declared = len(re.findall(r"\\.param", entry[: entry.index(")")]))
        ins, outs = contract.PLUGIN_IO[plugin]
        assert declared == len(ins) + len(outs) + scalars, (k.name, declared)  # what TensorRT passes, no more
        r = resource_usage(k)  # ptxas assembles the very PTX TensorRT gets
        assert r.fits_shared() and r.registers <= 255, r
        assert r.spill_store_bytes <= SPILLS[k.name], r
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


_PTX = """.version 8.7
.target sm_90a
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
.reqntid 128
{
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u32 %r1, [k_param_1];
HIDDEN_USE}
"""


def test_hidden_scratch_params_are_dropped_only_when_unused() -> None:
    """Triton >= 3.3 appends two scratch pointers TensorRT's AOT launch does not pass: they are removed
    when nothing reads them, and the kernel is refused (not silently mis-launched) when something does."""
    ptx = _PTX.replace("HIDDEN_USE", "")
    out = tp.drop_hidden_params(ptx, "k", num_params=2)
    decl = out[out.index(".entry k("): out.index(")")]
    assert "k_param_1\n" in decl + "\n" and "k_param_2" not in decl and "k_param_3" not in decl
    assert not decl.rstrip().endswith(",") and "ld.param.u32 %r1, [k_param_1]" in out
    assert tp.drop_hidden_params(out, "k", num_params=2) == out  # nothing hidden: unchanged
    with pytest.raises(RuntimeError, match="ABI"):
        tp.drop_hidden_params(_PTX.replace("HIDDEN_USE", "\tld.param.u64 %rd3, [k_param_3];\n"), "k", num_params=2)
    with pytest.raises(RuntimeError, match="ABI"):
        tp.drop_hidden_params(ptx, "k", num_params=2, scratch_bytes=384)
    with pytest.raises(RuntimeError, match="ABI"):
        tp.drop_hidden_params(ptx, "k", num_params=5)

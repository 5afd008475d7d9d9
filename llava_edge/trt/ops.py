"""Which ONNX operators a TensorRT version's ONNX parser imports, and a checker for our graphs.

Checking before building turns "the parser failed on node 4711" (after minutes of loading weights on a
Jetson) into an immediate message naming the op, the graph and the TensorRT version that would take it.
The table follows onnx/onnx-tensorrt ``docs/operators.md`` (10.0 and 10.15 matrices) and the changelogs'
version gates (Attention from 10.14; RotaryEmbedding, RMSNormalization, TensorScatter from 10.15), with
the matrix's DequantizeLinear restrictions (zero ``x_zero_point``; INT4 blocks symmetric, 2-D scale).
Pure Python + ``onnx``. See docs/architecture.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import UsageError
from ..contract import AOT_MIN, ONNX_DOMAIN, PLUGIN_IO, PLUGIN_NAMESPACE

__all__ = ["SUPPORTED_OPS", "VERSION_GATED", "MAX_OPSET", "supported_ops", "GraphIssue", "GraphCheck",
           "check_model", "check_onnx_file", "UnsupportedGraphError"]

# Default-domain ops marked "Y" in the TensorRT 10.15 operators.md matrix, minus the version-gated ones.
SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())

# op -> first TensorRT version whose ONNX parser imports it (changelogs cited in the module docstring).
VERSION_GATED: dict[str, tuple[int, int]] = {
    "Attention": (10, 14),  # 4-D Q/K/V only; past_key/past_value/present outputs unsupported
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),  # 4-D, axis -2: the KV-cache write
}

# Highest documented opset per TensorRT snapshot. A newer opset is a warning, not an error: the parser
# reads nodes by op type and most ops keep their semantics across opsets.
MAX_OPSET: dict[tuple[int, int], int] = {(10, 0): 20, (10, 15): 24, (11, 0): 24}

_QUANTIZED = {"INT8", "INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT4E2M1"}
_FP8 = {"FLOAT8E4M3FN", "FLOAT8E5M2"}


def _v2(version: tuple[int, ...]) -> tuple[int, int]:
    v = tuple(version) + (0, 0)
    return int(v[0]), int(v[1])


def supported_ops(trt_version: tuple[int, ...]) -> frozenset[str]:
    """Default-domain ONNX ops the parser of ``trt_version`` imports (TensorRT >= 10.0 only)."""
    v = _v2(trt_version)
    if v < (10, 0):
        raise UsageError(f"TensorRT {'.'.join(map(str, trt_version))} is not supported by llava-edge (needs >= 10.0)")
    return SUPPORTED_OPS | {op for op, gate in VERSION_GATED.items() if v >= gate}


def max_opset(trt_version: tuple[int, ...]) -> int:
    v = _v2(trt_version)
    return max(o for gate, o in MAX_OPSET.items() if gate <= v)


@dataclass(frozen=True)
class GraphIssue:
    severity: str  # "error" | "warning"
    node: str
    message: str


@dataclass
class GraphCheck:
    graph: str
    trt_version: tuple[int, ...]
    op_counts: dict[str, int] = field(default_factory=dict)
    issues: list[GraphIssue] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # our plugin ops present in the graph

    @property
    def errors(self) -> list[GraphIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> str:
        v = ".".join(map(str, self.trt_version))
        if self.ok:
            warn = f" ({len(self.issues)} warning(s))" if self.issues else ""
            return f"{self.graph}: all {sum(self.op_counts.values())} nodes importable by TensorRT {v}{warn}"
        lines = [f"{self.graph}: {len(self.errors)} node(s) TensorRT {v} cannot import:"]
        seen: set[str] = set()
        for e in self.errors:
            if e.message not in seen:  # one line per distinct problem, not per node
                seen.add(e.message)
                lines.append(f"  - {e.message} (first at node {e.node!r})")
        return "\n".join(lines)


class UnsupportedGraphError(Exception):
    """A graph contains nodes the target TensorRT version cannot import; the message lists them."""


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type)


def _initializer_info(model) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """name -> (dtype name, dims, the TensorProto) for initializers and Constant nodes."""
    out = {}
    for init in model.graph.initializer:
        out[init.name] = (_dtype_name(init.data_type), tuple(init.dims), init)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    out[node.output[0]] = (_dtype_name(a.t.data_type), tuple(a.t.dims), a.t)
    return out


def _all_zero(tensor) -> bool:
    from onnx import numpy_helper

    try:
        return not numpy_helper.to_array(tensor).astype("int64").any()
    except Exception:  # external data not loaded: cannot tell, do not accuse
        return True


def _check_dq(node, consts, issues: list[GraphIssue], fp8_ok: bool) -> None:
    """DequantizeLinear rules: zero point zero (symmetric), INT4 only blocked with a 2-D scale,
    blocked quantization only for INT4, no FP8 on targets without it (Orin)."""
    x = consts.get(node.input[0])
    attrs = {a.name: a for a in node.attribute}
    block = attrs["block_size"].i if "block_size" in attrs else 0
    if len(node.input) > 2 and node.input[2]:
        zp = consts.get(node.input[2])
        if zp is None or not _all_zero(zp[2]):
            issues.append(GraphIssue("error", node.name, "DequantizeLinear with a non-zero zero point "
                                     "(TensorRT takes symmetric quantization only; re-quantize with sym=True)"))
    if x is None:
        return
    dtype = x[0]
    if dtype in _FP8 and not fp8_ok:
        issues.append(GraphIssue("error", node.name, f"{dtype} DequantizeLinear: this target has no FP8 (Orin)"))
    if dtype in ("INT4", "UINT4"):
        if dtype == "UINT4":
            issues.append(GraphIssue("error", node.name, "UINT4 weights: TensorRT takes signed INT4 only"))
        scale = consts.get(node.input[1])
        if not block or scale is None or len(scale[1]) != 2:
            issues.append(GraphIssue("error", node.name, "INT4 DequantizeLinear must be block-quantized with "
                                     "a 2-D scale (block_size attribute, opset 21)"))
    elif block and dtype not in ("INT4", "UINT4"):
        issues.append(GraphIssue("error", node.name, f"block-quantized {dtype} DequantizeLinear: TensorRT "
                                 "supports block quantization for INT4 only"))


def check_model(model, graph: str, trt_version: tuple[int, ...], fp8: bool = False,
                plugins_allowed: bool | None = None) -> GraphCheck:
    """Check every node of an ``onnx.ModelProto`` against ``trt_version``'s parser.

    ``plugins_allowed`` (default: TensorRT >= 10.9, the AOT-plugin gate of ``contract``) says
    whether our ``llava_edge::*`` plugin nodes are acceptable. Any other non-default domain (e.g.
    ``com.microsoft`` MatMulNBits / GroupQueryAttention, which are onnxruntime contrib ops) is an error.
    """
    v = tuple(trt_version)
    ok_ops = supported_ops(v)
    allow_plugins = _v2(v) >= AOT_MIN if plugins_allowed is None else plugins_allowed
    result = GraphCheck(graph, v)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > max_opset(v):
        result.issues.append(GraphIssue("warning", "", f"opset {opset} is newer than TensorRT "
                                        f"{'.'.join(map(str, v))} documents ({max_opset(v)})"))
    consts = _initializer_info(model)
    counts: Counter[str] = Counter()
    plugin_ops: set[str] = set()
    for node in _walk(model.graph.node):
        domain = node.domain or ""
        key = node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"
        counts[key] += 1
        if domain in ("", "ai.onnx"):
            gate = VERSION_GATED.get(node.op_type)
            if node.op_type not in ok_ops:
                why = (f"needs TensorRT >= {gate[0]}.{gate[1]}" if gate else "not supported by TensorRT's ONNX parser")
                result.issues.append(GraphIssue("error", node.name, f"{node.op_type}: {why}"))
            elif node.op_type == "DequantizeLinear":
                _check_dq(node, consts, result.issues, fp8)
        elif domain == ONNX_DOMAIN and node.op_type in PLUGIN_IO:
            ns = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), "")
            plugin_ops.add(node.op_type)
            if ns != PLUGIN_NAMESPACE:
                result.issues.append(GraphIssue("error", node.name, f"plugin node {node.op_type} has namespace "
                                                f"{ns!r}, expected {PLUGIN_NAMESPACE!r}"))
            elif not allow_plugins:
                result.issues.append(GraphIssue(
                    "error", node.name, f"{PLUGIN_NAMESPACE}::{node.op_type} plugin: needs TensorRT >= "
                    f"{AOT_MIN[0]}.{AOT_MIN[1]} (AOT Python plugins) and --plugins auto/on; re-export with "
                    "standard attention for this target"))
        else:
            hint = (" (an onnxruntime contrib op: re-quantize with --format qdq for TensorRT)"
                    if domain == "com.microsoft" else "")
            result.issues.append(GraphIssue("error", node.name, f"{domain}::{node.op_type}: custom-domain op "
                                            f"TensorRT cannot import{hint}"))
    for t in list(model.graph.input) + list(model.graph.output):
        dt = _dtype_name(t.type.tensor_type.elem_type)
        if dt in ("DOUBLE", "STRING", "COMPLEX64", "COMPLEX128") or dt in _QUANTIZED - {"INT8"}:
            result.issues.append(GraphIssue("error", t.name, f"graph I/O {t.name!r} has type {dt}, which "
                                            "TensorRT does not take as an engine input/output"))
    result.op_counts = dict(sorted(counts.items()))
    result.plugins = sorted(plugin_ops)
    return result


def _walk(nodes: Iterable) -> Iterable:
    """Nodes including those of If/Loop/Scan subgraphs."""
    for node in nodes:
        yield node
        for a in node.attribute:
            if a.g is not None and a.g.node:
                yield from _walk(a.g.node)
            for g in a.graphs:
                yield from _walk(g.node)


def check_onnx_file(path: str | Path, graph: str, trt_version: tuple[int, ...], fp8: bool = False,
                    plugins_allowed: bool | None = None) -> GraphCheck:
    """Load the graph structure (not the external weights) and check it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, graph, trt_version, fp8, plugins_allowed)

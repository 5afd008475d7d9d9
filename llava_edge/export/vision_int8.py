"""int8 vision tower: rewrite an exported fp32 vision.onnx so its MatMuls run in int8.

The vision graph is compute bound (every image runs hundreds of tokens through the tower at once), so
on a CPU with int8 dot products (AVX-512 VNNI, AVX-VNNI, ARM dot-product) int8 weights *and* int8
activations are what pays, not just smaller weights. Two rewrites (`export --vision`), same contract
in and out (`pixel_values` -> `image_features`), so the runtime loads either unchanged:

* ``int8`` = method ``dynamic``: onnxruntime.quantization.quantize_dynamic (MatMulInteger, fused at
  load into DynamicQuantizeMatMul): int8 weights per output column, activations uint8 with one scale
  per tensor computed at run time. The faster one (x2.3-2.6 over fp32 on ViT-L/14-336 and ViT-B/16).
* ``int8-blocked`` = method ``matmulnbits``: each MatMul becomes ``com.microsoft.MatMulNBits`` with
  ``bits=8``, symmetric per output column and block along K (the int8 layout of packing.py:
  ``q + 128``, default zero point) and ``accuracy_level=4``: activations int8 with a scale per block
  too, which an outlier activation channel cannot stretch across the whole tensor. x1.6 over fp32.

The patch Conv and everything else (LayerNorm, softmax, attention's activation-by-activation
MatMuls) stay fp32: the Conv is one op and <2% of the tower's work. Measurements: docs/quantization.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LlavaEdgeError
from ..onnx_io import MAX_IR_VERSION
from .onnx_export import _save_streamed

METHODS = ("matmulnbits", "dynamic")
# The export check has two bounds. End to end: ||int8 - fp32|| / ||fp32|| of the image features on the
# check images against the fp32 torch tower, measured 0.007 (shipped tiny model) to 0.02-0.03 (random
# edge-1b and ViT-L/14-336 towers): weight rounding and the activations' int8 each cost ~1% per MatMul.
# A systematic fault (a wrong scale rule, packing or zero point in every MatMul) is ~1.0. A fault in a
# single MatMul can hide end to end (a q or k scale x2 only sharpens one softmax: 0.05 on the tiny model),
# so each stored weight, read back as its kernel reads it, must also be within WEIGHT_TOLERANCE of the
# fp32 weight: rounding costs ~0.01 (per column of Gaussian weights; a 20-sigma outlier in a column
# ~0.05), a scale x2 is 1.0, swapped or misordered codes >= 1.
RELATIVE_TOLERANCE = 0.05
WEIGHT_TOLERANCE = 0.1


class VisionQuantError(LlavaEdgeError):
    pass


@dataclass
class VisionQuant:
    """What was done to vision.onnx; recorded as manifest.extra["vision_quant"]."""

    method: str = "matmulnbits"
    bits: int = 8
    block_size: int = 128
    accuracy_level: int = 4
    per_channel: bool = True  # dynamic: weight scale per output column (else per tensor)
    quantized: int = 0  # MatMuls rewritten
    skipped: list[str] | None = None  # MatMuls left fp32 (no block size divides K)
    relative_error: float | None = None  # image features vs the fp32 torch tower on the check images
    weight_error: float | None = None  # the largest ||W_int8 - W|| / ||W|| of a quantized MatMul

    def to_dict(self) -> dict:
        return asdict(self)


def int8_blocks(w_t: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float weight -> MatMulNBits B uint8 [N, K/bs, bs] (``q + 128``) and scales float32 [N, K/bs].

    Symmetric round-to-nearest per output column and block: scale = max|w| / 127, q in [-127, 127]."""
    k, n = w_t.shape
    w = w_t.T.astype(np.float32).reshape(n, k // block_size, block_size)
    scale = np.abs(w).max(axis=-1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int16)
    return (q + 128).astype(np.uint8), scale.astype(np.float32)


def _block_size(k: int, preferred: int) -> int | None:
    """The preferred block if it divides K, else the largest power of two >= 16 that does."""
    bs = preferred
    while bs >= 16:
        if k % bs == 0:
            return bs
        bs //= 2
    return None


def rewrite_matmulnbits(model: onnx.ModelProto, cfg: VisionQuant) -> onnx.ModelProto:
    """In place: each MatMul(x, W const fp32 [K, N]) -> MatMulNBits(x, B, scales) bits=8."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    skipped, dropped = [], set()
    new_inits = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2:
            continue
        k, n = t.dims
        bs = _block_size(k, cfg.block_size)
        if bs is None:
            skipped.append(node.name)
            continue
        packed, scales = int8_blocks(numpy_helper.to_array(t), bs)
        b, s = node.input[1] + "_quantized", node.input[1] + "_scale"  # quantize_dynamic's names
        new_inits += [numpy_helper.from_array(packed, b), numpy_helper.from_array(scales.reshape(-1), s)]
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            dropped.add(node.input[1])
        repl = helper.make_node("MatMulNBits", [node.input[0], b, s], list(node.output), name=node.name + "NBits",
                                domain="com.microsoft", K=k, N=n, bits=8, block_size=bs,
                                accuracy_level=cfg.accuracy_level)
        model.graph.node[i].CopyFrom(repl)
        cfg.quantized += 1
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    cfg.skipped = skipped
    return model


def quantize_vision(src: Path, dst: Path, cfg: VisionQuant | None = None) -> VisionQuant:
    """Write the int8 rewrite of the fp32 graph `src` to `dst` (may be the same path); returns what was done."""
    cfg = cfg or VisionQuant()
    if cfg.method not in METHODS:
        raise ValueError(f"unknown vision quantization {cfg.method!r}; use {', '.join(METHODS)}")
    src, dst = Path(src), Path(dst)
    if cfg.method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg.block_size, cfg.accuracy_level = 0, 0
        tmp = dst.with_name(dst.name + ".q.onnx")
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its "run pre-processing first" note is for static quantization
        try:
            quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                             op_types_to_quantize=["MatMul"])
        finally:
            root.setLevel(level)
        model = onnx.load(str(tmp))
        tmp.unlink()
        cfg.quantized = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)
        cfg.skipped = []
    else:
        model = rewrite_matmulnbits(onnx.load(str(src)), cfg)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    # Weights out of line even when small: onnxruntime keeps an inline graph's protobuf beside its
    # tensors (ViT-L/14-336 int8: 571 MB resident inline, 309 MB from the data file).
    _save_streamed(model, dst.parent, dst)
    return cfg


def options() -> dict[str, VisionQuant | None]:
    """`export --vision` values: fp32 (no rewrite) and the int8 rewrites."""
    return {"fp32": None, "int8": VisionQuant(method="dynamic", per_channel=True, block_size=0, accuracy_level=0),
            "int8-blocked": VisionQuant(method="matmulnbits")}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| over the whole output (all images, tokens and channels)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each int8 MatMul weight of a rewritten graph, read back as its kernel reads it: {fp32 weight
    name: [K, N] float32}. MatMulNBits: B [N, K/bs, bs] uint8 minus 128 times scales [N, K/bs];
    MatMulInteger: (B [K, N] int8 - zero point) times the per-column (or per-tensor) scale."""
    inits = {t.name: t for t in model.graph.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name]).astype(np.float32)  # noqa: E731
    out = {}
    for node in model.graph.node:
        name = node.input[1].removesuffix("_quantized") if len(node.input) > 1 else ""
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            n, k, bs = a["N"], a["K"], a["block_size"]
            q = arr(node.input[1]).reshape(n, k // bs, bs) - 2 ** (a["bits"] - 1)
            out[name] = (q * arr(node.input[2]).reshape(n, k // bs, 1)).reshape(n, k).T
        elif node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
            zp = arr(name + "_zero_point") if name + "_zero_point" in inits else 0.0
            out[name] = (arr(node.input[1]) - zp) * arr(name + "_scale")
    return out


def weight_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> dict[str, float]:
    """||W_int8 - W|| / ||W|| per quantized MatMul weight (see WEIGHT_TOLERANCE)."""
    inits = {t.name: t for t in fp32.graph.initializer}
    return {name: relative_error(w, numpy_helper.to_array(inits[name]))
            for name, w in dequantized_weights(int8).items()}


def quantize_checked(package_dir: Path, spec, inputs: tuple, want: list[np.ndarray], option: str) -> VisionQuant:
    """Rewrite the package's verified fp32 vision graph in place to `option` and check it (see
    RELATIVE_TOLERANCE, WEIGHT_TOLERANCE): every stored weight against the fp32 graph's, and the
    image features on the check `inputs` against the torch tower's `want`. Updates `spec` (external
    files, max_abs_error of the int8 graph). Raises VisionQuantError when a bound is exceeded."""
    from .verify import session

    cfg = options()[option]
    path = Path(package_dir) / spec.file
    fp32 = onnx.load(str(path))
    quantize_vision(path, path, cfg)
    errs = weight_errors(fp32, onnx.load(str(path)))
    del fp32
    spec.external_data = [f.name for f in path.parent.glob(path.name + "*.data")]
    fix = "export with --vision fp32" + (" or int8-blocked (activation scale per block of 128)"
                                         if option == "int8" else "")
    if not errs:
        raise VisionQuantError(f"the {option} rewrite quantized no MatMul of the vision graph; {fix}")
    worst = max(errs, key=errs.get)
    if not errs[worst] <= WEIGHT_TOLERANCE:
        raise VisionQuantError(f"the {option} vision graph's weight {worst} is {errs[worst]:.3g} (relative) from "
                               f"the fp32 weight (> {WEIGHT_TOLERANCE}); {fix}")
    got = session(path).run(None, {s.name: t.numpy() for s, t in zip(spec.inputs, inputs)})[0]
    cfg.relative_error = relative_error(got, want[0])
    cfg.weight_error = errs[worst]
    spec.max_abs_error = float(np.abs(got.astype(np.float64) - want[0]).max())
    if not cfg.relative_error <= RELATIVE_TOLERANCE:
        raise VisionQuantError(f"the {option} vision graph is {cfg.relative_error:.3g} (relative) from the fp32 tower "
                               f"(> {RELATIVE_TOLERANCE}); {fix}")
    return cfg

"""Import an existing GPTQ checkpoint (AutoGPTQ / GPTQModel / HF ``GPTQConfig`` layout) into our
symmetric, g_idx-free packed format, without re-running the algorithm.

AutoGPTQ stores each Linear as int32-packed tensors (``pack = 32 / bits`` codes per word, lowest
bits first):

* ``qweight`` int32 [K / pack, N]: code of (k, n) in word ``qweight[k // pack, n]`` at bit
  ``bits * (k % pack)``; codes are unsigned in [0, 2^bits);
* ``qzeros`` int32 [G, N / pack]: zero point of (group, n), packed along N the same way;
* ``scales`` float16 [G, N];
* ``g_idx`` int32 [K]: the group of each input channel (``k // group_size`` unless desc_act).

``W[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``. The v1 format
(``checkpoint_format: "gptq"``, AutoGPTQ) stores ``zero - 1`` (an old off-by-one kept for
compatibility); v2 (``"gptq_v2"``, GPTQModel) stores the zero itself.

What maps: symmetric checkpoints (every zero is ``2^(bits-1)``), 4 or 8 bits, power-of-two groups.
Act-order (``desc_act``) checkpoints have a non-trivial ``g_idx``; if every group holds exactly
``group_size`` channels we sort the input channels by group, which makes the groups contiguous,
and undo the permutation outside the GEMM: for ``down_proj`` by permuting the output rows of
``gate_proj``/``up_proj`` (free and exact: the intermediate channels are just renamed), for the
other Linears with a ``Gather`` on the activation in the graph. Anything else is a clear error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LlavaEdgeError
from ..packing import QuantizedLinear, qrange
from .rtn import check_group_size

_LINEAR_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
)


class GPTQImportError(LlavaEdgeError):
    """The checkpoint cannot be represented in llava-edge's packed format; the message says why."""


@dataclass
class GPTQImport:
    quantized: dict[str, QuantizedLinear]
    bits: int
    group_size: int
    desc_act: bool
    checkpoint_format: str
    notes: list[str] = field(default_factory=list)


def canonical_key(module_path: str) -> str | None:
    """``model.language_model.layers.3.self_attn.q_proj`` -> ``layers.3.q_proj``; lm_head kept."""
    if module_path.split(".")[-1] == "lm_head":
        return "lm_head"
    m = _LINEAR_RE.search(module_path)
    if not m:
        return None
    layer, attn, mlp = m.groups()
    return f"layers.{layer}.{attn}" if attn else f"layers.{layer}.mlp.{mlp}"


# -------------------------------------------------------------------------------------------
# int32 packing, both directions (the packer writes test fixtures and interop checkpoints).


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned codes from int32 words packed along ``axis`` (0: rows, 1: columns)."""
    pack = 32 // bits
    words = np.ascontiguousarray(packed).view(np.uint32)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & mask  # [K/pack, pack, N]
        return codes.reshape(-1, words.shape[1]).astype(np.int32)
    codes = (words[:, :, None] >> shifts[None, None, :]) & mask  # [G, N/pack, pack]
    return codes.reshape(words.shape[0], -1).astype(np.int32)


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of :func:`unpack_int32` (AutoGPTQ's ``pack`` loop, vectorised)."""
    pack = 32 // bits
    c = np.asarray(codes).astype(np.uint32) & np.uint32((1 << bits) - 1)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)
    if axis == 0:
        c = c.reshape(-1, pack, c.shape[1]) << shifts[None, :, None]
        words = np.bitwise_or.reduce(c, axis=1)
    else:
        c = c.reshape(c.shape[0], -1, pack) << shifts[None, None, :]
        words = np.bitwise_or.reduce(c, axis=2)
    return np.ascontiguousarray(words.astype(np.uint32)).view(np.int32)


def to_autogptq(q: QuantizedLinear, v1: bool = True, g_idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Our symmetric format -> AutoGPTQ tensors (qweight, qzeros, scales, g_idx). Used to write
    interop checkpoints and test fixtures; ``g_idx`` may describe a desc_act layout (then ``q``'s
    codes/scales are interpreted with it)."""
    n, k = q.shape
    qmin, _ = qrange(q.bits)
    groups = k // q.group_size
    g_idx = np.arange(k, dtype=np.int32) // q.group_size if g_idx is None else np.asarray(g_idx, np.int32)
    codes = (q.q.cpu().numpy().astype(np.int32) - qmin).T  # [K, N] unsigned
    zeros = np.full((groups, n), -qmin - (1 if v1 else 0), dtype=np.int32)
    return {
        "qweight": pack_int32(codes, q.bits, axis=0),
        "qzeros": pack_int32(zeros, q.bits, axis=1),
        "scales": np.ascontiguousarray(q.scales.cpu().numpy().T, dtype=np.float16),
        "g_idx": g_idx,
    }


# -------------------------------------------------------------------------------------------


def read_quantize_config(path: Path) -> dict[str, Any]:
    for name in ("quantize_config.json", "quantization_config.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    if (path / "config.json").is_file():
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
        if qc:
            return qc
    raise GPTQImportError(f"{path}: no quantize_config.json and no quantization_config in config.json; "
                          "not a GPTQ checkpoint")


def convert_linear(
    name: str, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
    bits: int, group_size: int, v1: bool,
) -> QuantizedLinear:
    """One AutoGPTQ Linear -> QuantizedLinear (with ``perm`` set when g_idx is not trivial)."""
    if bits not in (4, 8):
        raise GPTQImportError(f"{name}: {bits}-bit GPTQ cannot map (llava-edge packs 4 and 8 bits)")
    codes = unpack_int32(qweight, bits, axis=0)  # [K, N]
    k, n = codes.shape
    zeros = unpack_int32(qzeros, bits, axis=1)[:, :n] + (1 if v1 else 0)
    scales = np.asarray(scales, dtype=np.float32)
    groups = scales.shape[0]
    if group_size in (-1, 0):
        group_size = k
    try:
        check_group_size(k, group_size)
    except ValueError as e:
        raise GPTQImportError(f"{name}: {e}; MatMulNBits needs power-of-two groups dividing K") from None
    if groups != k // group_size or zeros.shape[0] != groups:
        raise GPTQImportError(f"{name}: {groups} scale rows for K={k} and group size {group_size}")
    qmin, qmax = qrange(bits)
    if not np.all(zeros == -qmin):
        bad = int((zeros != -qmin).sum())
        raise GPTQImportError(
            f"{name}: asymmetric quantization ({bad} zero points differ from {-qmin}"
            f"{'; if this is a GPTQModel v2 checkpoint set checkpoint_format=gptq_v2' if v1 else ''}). "
            "llava-edge's packed format has no zero points (MatMulNBits prepacking); "
            "re-quantize from the float checkpoint with --method gptq instead"
        )
    signed = (codes + qmin).T.astype(np.int8)  # [N, K]
    trivial = np.arange(k) // group_size
    g_idx = trivial if g_idx is None else np.asarray(g_idx, dtype=np.int64)
    perm = None
    if not np.array_equal(g_idx, trivial):
        counts = np.bincount(g_idx, minlength=groups)
        if g_idx.min() < 0 or g_idx.max() >= groups or not np.all(counts == group_size):
            raise GPTQImportError(f"{name}: g_idx does not assign exactly {group_size} channels to each group; "
                                  "cannot make the groups contiguous")
        order = np.argsort(g_idx, kind="stable")
        signed = signed[:, order]
        perm = torch.from_numpy(order.astype(np.int64))
    return QuantizedLinear(
        q=torch.from_numpy(np.ascontiguousarray(signed)), scales=torch.from_numpy(np.ascontiguousarray(scales.T)),
        bits=bits, group_size=group_size, perm=perm,
    )


def fold_mlp_permutations(quantized: dict[str, QuantizedLinear]) -> list[str]:
    """Absorb down_proj's input permutation into gate/up output rows (exact, no runtime cost)."""
    notes = []
    for key in [k for k in quantized if k.endswith("mlp.down_proj")]:
        down = quantized[key]
        prefix = key[: -len("down_proj")]
        gate, up = quantized.get(prefix + "gate_proj"), quantized.get(prefix + "up_proj")
        if down.perm is None or gate is None or up is None:
            continue
        p = down.perm
        for lin in (gate, up):
            lin.q = lin.q[p].contiguous()
            lin.scales = lin.scales[p].contiguous()
        down.perm = None
        notes.append(f"{key}: act-order permutation folded into gate/up rows")
    return notes


def import_gptq_checkpoint(path: str | Path, include_lm_head: bool = True) -> GPTQImport:
    """Read every quantized decoder Linear of a GPTQ checkpoint directory (*.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise GPTQImportError(f"GPTQ checkpoint directory not found: {path}")
    qc = read_quantize_config(path)
    bits = int(qc.get("bits", 4))
    group_size = int(qc.get("group_size", 128))
    desc_act = bool(qc.get("desc_act", False))
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise GPTQImportError(f"{path}: checkpoint_format {fmt!r} is not GPTQ (gptq / gptq_v2)")
    if qc.get("sym") is False:
        raise GPTQImportError(f"{path}: sym=false (asymmetric) GPTQ cannot map to the zero-point-free format; "
                              "re-quantize from the float checkpoint with --method gptq")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GPTQImportError(f"{path}: no *.safetensors files")

    tensors: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), "np") as sf:
            for name in sf.keys():
                tensors[name] = (f, name)

    def get(name: str) -> np.ndarray:
        f, key = tensors[name]
        with safe_open(str(f), "np") as sf:
            return sf.get_tensor(key)

    quantized: dict[str, QuantizedLinear] = {}
    for name in sorted(t for t in tensors if t.endswith(".qweight")):
        module = name[: -len(".qweight")]
        key = canonical_key(module)
        if key is None or (key == "lm_head" and not include_lm_head):
            continue
        for part in ("qzeros", "scales"):
            if f"{module}.{part}" not in tensors:
                raise GPTQImportError(f"{module}: has qweight but no {part}")
        if f"{module}.bias" in tensors and np.any(get(f"{module}.bias") != 0):
            raise GPTQImportError(f"{module}: has a non-zero bias; the decoder graph has no bias for it")
        g_idx = get(f"{module}.g_idx") if f"{module}.g_idx" in tensors else None
        quantized[key] = convert_linear(module, get(name), get(f"{module}.qzeros"), get(f"{module}.scales"),
                                        g_idx, bits, group_size, v1=(fmt == "gptq"))
    if not quantized:
        raise GPTQImportError(f"{path}: no quantized decoder Linear (*.layers.N.*_proj.qweight) found")
    notes = fold_mlp_permutations(quantized)
    return GPTQImport(quantized, bits, group_size, desc_act, fmt, notes)

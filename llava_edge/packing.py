"""Packed integer weight formats: the one layout every consumer of a quantized Linear shares.

A torch Linear weight W is [N=out, K=in]. It is quantized symmetrically per group of ``g``
consecutive input channels (along K): ``W[n, k] ~= q[n, k] * scales[n, k // g]`` with ``q`` a signed
integer in ``[-2^(b-1), 2^(b-1) - 1]``. That is exactly ORT's ``MatMulNBits`` layout with its default
zero point (``2^(b-1)``), and the Triton int4 kernels read the same bytes, so the bytes written
here are the bytes executed everywhere:

* int4: ``qweight`` uint8 [N, K // 2], unsigned ``q + 8``; byte ``j`` of a row holds element ``2j``
  in the LOW nibble and element ``2j + 1`` in the HIGH nibble.
* int8: ``qweight`` uint8 [N, K], unsigned ``q + 128``.

No zero points, no g_idx: act-order is handled at quantization time (static groups), so a
stored group is always ``g`` consecutive columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError

SUPPORTED_BITS = (4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """Signed range of a symmetric ``bits``-bit code: (-8, 7) for int4, (-128, 127) for int8."""
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class QuantizedLinear:
    """The result of quantizing one Linear, before packing.

    ``q`` holds signed integer codes [N, K] (int8 storage for both widths), ``scales`` [N, K // g]
    float32. ``perm`` is an optional input-channel permutation (only produced by importing
    act-order GPTQ checkpoints whose order cannot be folded elsewhere): ``y = x[..., perm] @ W^T``.
    """

    q: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """W as float32 [N, K], in the stored (possibly permuted) column order."""
        return dequantize(self.q, self.scales, self.group_size)

    def dequantize_original_order(self) -> torch.Tensor:
        """W such that ``y = x @ W^T`` for the original input order (undoes ``perm``)."""
        w = self.dequantize()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def pack(self) -> np.ndarray:
        return pack(self.q, self.bits)


def concat_outputs(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """Several quantized Linears that read the same input as one (rows stacked along N): the fast
    decoder's fused q/k/v and gate/up. Each part keeps its own codes and scales, so the fused matrix
    computes exactly the parts' outputs side by side."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]):
            raise ValueError("fused Linears must share bits, group size and input width")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError("fused Linears must share one input-channel order")
    return QuantizedLinear(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), first.bits,
                           first.group_size, first.perm)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    return (q.float().view(n, k // group_size, group_size) * scales.float().unsqueeze(-1)).view(n, k)


def pack(q: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [N, K] -> uint8 [N, K // 2] (int4) or [N, K] (int8)."""
    qmin, qmax = qrange(bits)
    q = q.cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    if q.min(initial=0) < qmin or q.max(initial=0) > qmax:
        raise ValueError(f"codes outside the int{bits} range [{qmin}, {qmax}]")
    u = (q.astype(np.int16) - qmin).astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {u.shape[-1]}")
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack(qweight: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 -> signed int8 codes [N, K]."""
    qmin, _ = qrange(bits)
    qweight = np.asarray(qweight, dtype=np.uint8)
    if bits == 8:
        return (qweight.astype(np.int16) + qmin).astype(np.int8)
    n, half = qweight.shape
    u = np.empty((n, half * 2), dtype=np.int16)
    u[:, 0::2] = qweight & 0x0F
    u[:, 1::2] = qweight >> 4
    return (u + qmin).astype(np.int8)


def dequantize_packed(qweight: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """What a consumer of the stored bytes computes: W[n, k] = (code) * scales[n, k // g]."""
    q = unpack(qweight, bits).astype(np.float32)
    n, k = q.shape
    s = np.asarray(scales, dtype=np.float32).reshape(n, k // group_size)
    return (q.reshape(n, k // group_size, group_size) * s[:, :, None]).reshape(n, k)


def pack_int4_onnx(values: np.ndarray) -> bytes:
    """ONNX INT4 raw_data: signed two's-complement nibbles, flat row-major, element 2i low."""
    flat = np.asarray(values, dtype=np.int8).reshape(1, -1)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((1, 1), np.int8)], axis=1)
    return (pack(flat, 4) ^ np.uint8(0x88)).tobytes()  # q + 8 with the top bit flipped = q's low nibble

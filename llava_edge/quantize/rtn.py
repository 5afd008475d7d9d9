"""Round-to-nearest: the baseline every GPTQ number is compared against, in the same format.

RTN and GPTQ share :func:`group_scales`, so any difference in their error is the algorithm's
(error feedback through the Hessian), not a different choice of scale.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..packing import QuantizedLinear, qrange

# Smallest positive fp16 subnormal: scales are floored here so that an all-zero group still
# divides cleanly and survives a round trip through fp16 unchanged.
_MIN_SCALE = 2.0**-24


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise UsageError(f"group size must be a power of two >= 16 (MatMulNBits block_size), got {group_size}")
    if in_features % group_size:
        raise UsageError(f"in_features={in_features} is not divisible by group size {group_size}")


def round_scales(scales: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to the dtype they will be stored in, so the algorithm quantizes against the
    exact scale the runtime multiplies by (fp16 packages store fp16 scales)."""
    scales = scales.clamp_min(_MIN_SCALE)
    return scales.to(scale_dtype).float()


def group_scales(w: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Symmetric scale for each row of ``w`` [N, g] (one group): the smallest scale that represents
    both the largest positive value (with qmax) and the most negative one (with qmin), so the
    asymmetric code range [-8, 7] is fully usable instead of wasting the -8 code."""
    qmin, qmax = qrange(bits)
    wmax = w.amax(dim=1).clamp_min(0)
    wmin = w.amin(dim=1).clamp_max(0)
    scales = torch.maximum(wmax / qmax, wmin / qmin)
    return round_scales(scales, scale_dtype)


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for columns ``w`` [N, c] given per-row ``scales`` [N]."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scales.unsqueeze(1)), qmin, qmax)


def rtn_quantize(
    weight: torch.Tensor, bits: int = 4, group_size: int = 128, scale_dtype: torch.dtype = torch.float32
) -> QuantizedLinear:
    """Quantize a Linear weight [N, K] by rounding each value to its group's grid."""
    w = weight.detach().float()
    n, k = w.shape
    check_group_size(k, group_size)
    groups = w.view(n, k // group_size, group_size)
    scales = torch.stack([group_scales(groups[:, j], bits, scale_dtype) for j in range(k // group_size)], dim=1)
    q = quantize_codes(groups.reshape(n * (k // group_size), group_size), scales.reshape(-1), bits)
    return QuantizedLinear(q=q.view(n, k).to(torch.int8), scales=scales, bits=bits, group_size=group_size)

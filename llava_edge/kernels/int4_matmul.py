"""int4 weight-only matmul ``y = x @ W^T`` on onnxruntime ``MatMulNBits``-packed weights.

Weights stay packed in memory (``qweight uint8 [N, K//2]``, low nibble = even k, high nibble = odd k,
value ``nibble - 8``; ``scales float16 [N, K//g]``, see ``reference.pack_int4``) and are dequantized
in registers, so a decode step reads 4.25-4.5 bits per weight instead of 16: that is the whole point
of int4 on a memory-bound decoder.

Two kernels because the shapes are two different problems:

* GEMV (decode, a handful of rows): no tensor cores, each program reduces a ``[BLOCK_N, BLOCK_K]``
  weight tile against the activations with a multiply + row sum; grid over N and rows.
* GEMM (prefill): tiled ``tl.dot``. Even and odd k are kept apart (``x[:, 0::2] @ W_even^T +
  x[:, 1::2] @ W_odd^T``) rather than interleaved back, which needs no shuffles; the per-group scale
  is applied once per output tile (``BLOCK_K`` divides the group) instead of per weight, since the
  nibble values -8..7 are exact in fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["int4_matmul", "int4_gemv", "int4_gemm", "gemv_tile", "GEMV_MAX_ROWS", "GEMV_BLOCK_N", "GEMV_BLOCK_K",
           "GEMV_NUM_WARPS", "GEMM_NUM_WARPS"]

GEMV_MAX_ROWS = 4  # above this the GEMM's weight reuse across rows wins
# GEMV tiles: 8 rows x 1024 k (8 groups of 128): 4 KB of weights per program and iteration, 512
# programs for N = 4096 (a 32 x 128 tile makes 128, fewer than a datacenter GPU has SMs), 64-66
# registers so 7-8 programs fit an SM (ptxas, sm_87 / sm_90). Chosen for bytes in flight, not timed
# yet: benchmarks/kernels/bench_int4_matmul.py sweeps the alternatives on a GPU.
GEMV_BLOCK_N = 8
GEMV_BLOCK_K = 1024
GEMV_NUM_WARPS = 4
# 8 warps: at 64x64x64 tiles 4 warps need 252-255 registers and spill (sm_87, sm_90); 8 warps do not
# (ptxas -v, `kernels/resources.py`).
GEMM_NUM_WARPS = 8


@triton.jit
def _unpack(w_bytes, dt: tl.constexpr):
    """uint8 tile -> (even-k, odd-k) tiles of signed values in ``dt`` (exact: -8..7)."""
    lo = (w_bytes & 0xF).to(tl.int32) - 8
    hi = (w_bytes >> 4).to(tl.int32) - 8
    return lo.to(dt), hi.to(dt)


@triton.jit
def _int4_gemv_kernel(
    X, QW, Scales,  # inputs
    N, K, stride_xm,  # int32 scalars
    Y,  # output
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr,
):
    # A tile spans TILE_GROUPS whole groups (BLOCK_K = TILE_GROUPS * GROUP_SIZE) or a part of one
    # (TILE_GROUPS = 1): wide tiles put more bytes in flight per program, which is what a
    # memory-bound GEMV needs when N / BLOCK_N programs are too few to hide the memory latency.
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, HALF_K)
    offs_g = tl.arange(0, TILE_GROUPS)
    num_groups = K // GROUP_SIZE
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + offs_j
        j_ok = j < K // 2  # a wide tile may overhang K; masked weights meet x = 0
        xe = tl.load(X + m * stride_xm + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
        xo = tl.load(X + m * stride_xm + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
        wb = tl.load(QW + offs_n[:, None].to(tl.int64) * (K // 2) + j[None, :], mask=n_ok[:, None] & j_ok[None, :],
                     other=0)
        we, wo = _unpack(wb, tl.float32)
        prod = we * xe[None, :] + wo * xo[None, :]  # [BLOCK_N, HALF_K]
        part = tl.sum(tl.reshape(prod, [BLOCK_N, TILE_GROUPS, HALF_K // TILE_GROUPS]), 2)  # per group
        g = k0 // GROUP_SIZE + offs_g
        sc = tl.load(Scales + offs_n[:, None] * num_groups + g[None, :], mask=n_ok[:, None] & (g < num_groups)[None, :],
                     other=0.0)
        acc += tl.sum(part * sc.to(tl.float32), 1)
    tl.store(Y + m * N + offs_n, acc.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemm_kernel(
    X, QW, Scales,  # inputs
    M, N, K, stride_xm,  # int32 scalars
    Y,  # output
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF_K: tl.constexpr = BLOCK_K // 2
    dt = X.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_j = tl.arange(0, HALF_K)
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = QW + offs_n[:, None].to(tl.int64) * (K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + offs_j
        xe = tl.load(x_rows + 2 * j[None, :], mask=m_ok[:, None], other=0.0)
        xo = tl.load(x_rows + 2 * j[None, :] + 1, mask=m_ok[:, None], other=0.0)
        wb = tl.load(w_rows + j[None, :], mask=n_ok[:, None], other=0)
        we, wo = _unpack(wb, dt)
        part = tl.dot(xe, tl.trans(we), input_precision=DOT_PRECISION)
        part = tl.dot(xo, tl.trans(wo), acc=part, input_precision=DOT_PRECISION)
        sc = tl.load(Scales + offs_n * (K // GROUP_SIZE) + k0 // GROUP_SIZE, mask=n_ok, other=0.0)
        acc += part * sc.to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int]:
    K = x.shape[-1]
    N = qweight.shape[0]
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, K // 2) or K % group_size:
        raise ValueError(f"qweight must be uint8 [N, K//2] with K % group_size == 0; got "
                         f"{tuple(qweight.shape)} {qweight.dtype} for K={K}")
    if tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"scales must be [N, K//group_size] = [{N}, {K // group_size}], got {tuple(scales.shape)}")
    return N, K


def _output(out: torch.Tensor | None, M: int, N: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(M, N, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (M, N) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be contiguous [{M}, {N}] {x.dtype}")
    return out


def gemv_tile(group_size: int, block_k: int | None = None) -> tuple[int, int]:
    """``(block_k, groups per tile)`` of a GEMV tile: ``block_k`` defaults to ``GEMV_BLOCK_K`` (at least
    one group); groups per tile is 1 when the tile is a part of a group. Refuses tiles that straddle
    groups. The wrapper and the TensorRT AOT compile both take their tile from here."""
    block_k = block_k or max(GEMV_BLOCK_K, group_size)
    if block_k < 2 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two >= 2")
    if group_size % block_k and block_k % group_size:
        raise ValueError(f"block_k={block_k} must divide group_size={group_size} or be a multiple of it")
    return block_k, max(1, block_k // group_size)


def int4_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
    block_n: int = GEMV_BLOCK_N, block_k: int | None = None, num_warps: int = GEMV_NUM_WARPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode path: ``x [M, K]`` with small M; returns ``[M, N]`` in ``x.dtype``.

    ``block_k`` (default ``GEMV_BLOCK_K``) may divide the group or span several whole groups.
    """
    N, K = _check(x, qweight, scales, group_size)
    x = x.contiguous()
    M = x.shape[0]
    block_k, tile_groups = gemv_tile(group_size, block_k)
    y = _output(out, M, N, x)
    _int4_gemv_kernel[(triton.cdiv(N, block_n), M)](
        x, qweight.contiguous(), scales.contiguous(), N, K, x.stride(0), y,
        GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_K=block_k, TILE_GROUPS=tile_groups, num_warps=num_warps,
    )
    return y


def int4_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
    block_m: int = 64, block_n: int = 64, block_k: int | None = None, num_warps: int = GEMM_NUM_WARPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill path: ``x [M, K]``; returns ``[M, N]`` in ``x.dtype``. ``block_k`` must divide the group."""
    N, K = _check(x, qweight, scales, group_size)
    x = x.contiguous()
    M = x.shape[0]
    block_k = block_k or min(group_size, 64)
    if group_size % block_k or block_k < 32:
        raise ValueError(f"block_k={block_k} must be >= 32 and divide group_size={group_size}")
    y = _output(out, M, N, x)
    _int4_gemm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        x, qweight.contiguous(), scales.contiguous(), M, N, K, x.stride(0), y,
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps,
    )
    return y


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``y = x @ dequant(qweight, scales)^T`` for ``x [..., K]``: GEMV for decode, GEMM for prefill."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn = int4_gemv if x2.shape[0] <= GEMV_MAX_ROWS else int4_gemm
    return fn(x2, qweight, scales, group_size).reshape(*lead, qweight.shape[0])

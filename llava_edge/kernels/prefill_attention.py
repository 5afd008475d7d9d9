"""Causal flash attention over a prompt (image tokens included) that fills the KV cache in the same pass.

Why fused: prefill otherwise writes rotated k/v to memory for the attention, then again into the cache;
here the rotated keys/values of the prompt go to the cache exactly once and attention over the prompt
reads the (unrotated) projections and rotates them in registers, so no program ever reads a cache row
that another program of the same launch is writing. A non-zero ``start_pos`` reuses a prefix already
in the cache (system prompt, image): those positions are read from the cache, the new tokens are
appended after them.

Layouts: ``q [B, T, H, D]``, ``k, v [B, T, kvH, D]`` (the projections viewed as heads: no transpose
needed), right-padded with ``prompt_lens int32 [B]``; caches ``[B, kvH, max_seq, D]``; token ``t`` of
sequence ``b`` lands at cache position ``start_pos[b] + t``. Output rows of padding tokens are 0.

Program ``(m_block, b * H + h)``; the first query head of each kv-head group also writes that kv
head's cache rows for its block of tokens. Parameter order follows the TensorRT AOT convention
(inputs, int32 scalars, outputs, constexprs), see ``decode_attention``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_kv_cache

__all__ = ["prefill_attention", "default_num_warps"]


def default_num_warps(head_dim: int) -> int:
    """8 warps from head_dim 128: with 4, a 64x64 tile spills ~1.4 KB per thread on sm_90 (255
    registers); with 8, about 150 B (ptxas -v, ``kernels/resources.py``)."""
    return 8 if head_dim >= 128 else 4


@triton.jit
def _rope_rows(X, rows, stride_row, Cos, Sin, pos, mask, HALF: tl.constexpr):
    """Load ``[len(rows), 2 * HALF]`` rows as two halves and apply rotate_half rotary at ``pos``."""
    offs_d = tl.arange(0, HALF)
    ptr = X + rows[:, None] * stride_row + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask[:, None], other=0.0).to(tl.float32)
    c = tl.load(Cos + pos[:, None] * HALF + offs_d[None, :], mask=mask[:, None], other=0.0)
    s = tl.load(Sin + pos[:, None] * HALF + offs_d[None, :], mask=mask[:, None], other=0.0)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _prefill_attention_kernel(
    Q, K, V, Prompt_lens, Start_pos, Cos, Sin, K_cache, V_cache,  # inputs
    seq_len, num_kv_heads, max_seq,  # int32 scalars (seq_len = padded prompt length T)
    Out, K_cache_out, V_cache_out,  # outputs (cache outputs alias the cache inputs)
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_heads = num_kv_heads * GROUP
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    kvh = h // GROUP
    HALF: tl.constexpr = HEAD_DIM // 2
    dt = K_cache.dtype.element_ty

    n = tl.load(Prompt_lens + b)
    s0 = tl.load(Start_pos + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HALF)
    offs_dv = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n
    has_rows = pid_m * BLOCK_M < n

    q_rows = b * seq_len * num_heads + offs_m * num_heads + h  # row index into Q viewed [B*T*H, D]
    kv_rows_m = b * seq_len * num_kv_heads + offs_m * num_kv_heads + kvh
    cache_base = (b * num_kv_heads + kvh) * max_seq * HEAD_DIM

    # 1) this block's rows of the cache, written once per kv head (by its group's first query head).
    if h % GROUP == 0:
        kr1, kr2 = _rope_rows(K, kv_rows_m, HEAD_DIM, Cos, Sin, s0 + offs_m, row_ok, HALF)
        dst = cache_base + (s0 + offs_m)[:, None] * HEAD_DIM
        tl.store(K_cache_out + dst + offs_d[None, :], kr1.to(dt), mask=row_ok[:, None])
        tl.store(K_cache_out + dst + HALF + offs_d[None, :], kr2.to(dt), mask=row_ok[:, None])
        vv = tl.load(V + kv_rows_m[:, None] * HEAD_DIM + offs_dv[None, :], mask=row_ok[:, None])
        tl.store(V_cache_out + dst + offs_dv[None, :], vv.to(dt), mask=row_ok[:, None])

    q1, q2 = _rope_rows(Q, q_rows, HEAD_DIM, Cos, Sin, s0 + offs_m, row_ok, HALF)
    q1 = (q1 * QK_SCALE).to(dt)
    q2 = (q2 * QK_SCALE).to(dt)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # 2) reused prefix: positions [0, s0) already in the cache (rotated), all visible to every query.
    prefix_end = tl.where(has_rows, s0, 0)
    for n0 in range(0, prefix_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < prefix_end
        row = cache_base + offs_n[:, None] * HEAD_DIM
        k1 = tl.load(K_cache + row + offs_d[None, :], mask=ok[:, None], other=0.0)
        k2 = tl.load(K_cache + row + HALF + offs_d[None, :], mask=ok[:, None], other=0.0)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2), acc=qk, input_precision=DOT_PRECISION)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(V_cache + row + offs_dv[None, :], mask=ok[:, None], other=0.0)
        acc = tl.dot(p.to(dt), vv, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # 3) the prompt itself, causal, keys rotated in registers (never read back from the cache).
    new_end = tl.where(has_rows, tl.minimum(n, (pid_m + 1) * BLOCK_M), 0)
    for n0 in range(0, new_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < new_end
        kv_rows_n = b * seq_len * num_kv_heads + offs_n * num_kv_heads + kvh
        k1, k2 = _rope_rows(K, kv_rows_n, HEAD_DIM, Cos, Sin, s0 + offs_n, ok, HALF)
        qk = tl.dot(q1, tl.trans(k1.to(dt)), input_precision=DOT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2.to(dt)), acc=qk, input_precision=DOT_PRECISION)
        visible = ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(V + kv_rows_n[:, None] * HEAD_DIM + offs_dv[None, :], mask=ok[:, None], other=0.0)
        acc = tl.dot(p.to(dt), vv.to(dt), acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = tl.where(row_ok[:, None], acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], 0.0)
    tl.store(Out + q_rows[:, None] * HEAD_DIM + offs_dv[None, :], o.to(Out.dtype.element_ty),
             mask=(offs_m < seq_len)[:, None])


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prompt_lens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    start_pos: torch.Tensor | None = None,
    sm_scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for right-padded prompts; writes rotated k and v to the cache in place.

    Returns ``[B, T, H, D]`` in ``q.dtype`` (padding rows are 0). The caller guarantees
    ``start_pos[b] + prompt_lens[b] <= max_seq`` and that the rotary tables cover those positions.
    """
    B, T, H, D = q.shape
    kvH = k.shape[2]
    S = k_cache.shape[2]
    if H % kvH or k.shape != (B, T, kvH, D) or v.shape != k.shape:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    check_kv_cache(k_cache, v_cache, B, kvH, D)
    if start_pos is None:
        start_pos = torch.zeros(B, dtype=torch.int32, device=q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped like q")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(T, block_m), B * H)
    _prefill_attention_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), prompt_lens.to(torch.int32),
        start_pos.to(torch.int32), cos.float().contiguous(), sin.float().contiguous(), k_cache, v_cache,
        T, kvH, S,
        out, k_cache, v_cache,
        HEAD_DIM=D, GROUP=H // kvH, BLOCK_M=block_m, BLOCK_N=block_n, QK_SCALE=scale * 1.4426950408889634,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", num_warps=num_warps or default_num_warps(D),
    )
    return out

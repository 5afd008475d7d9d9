"""Fused decode attention: rotary + in-place KV append + split-K (flash-decoding) attention, one launch.

Why one kernel: a decode step of a 7B model is pure memory traffic (the KV cache is read once per
token), so separate rotary / scatter / attention / combine launches cost more in launch latency and
round trips than they save. Why split-K: batch 1 has only ``num_kv_heads`` (32 for LLaVA-7B) programs
without it, a quarter of an H100's SMs; splitting the context over ``num_splits`` programs fills the
GPU, and the *last* program of each (sequence, kv head) to finish merges the partial softmaxes
(counted with an atomic), so there is no second "combine" launch and the kernel stays one launch,
which is what a TensorRT AOT plugin can embed.

Layouts (contiguous): ``q [B, H, D]``, new ``k, v [B, kvH, D]`` (before rotary), caches
``[B, kvH, max_seq, D]``, ``seq_lens int32 [B]`` = tokens already cached, rotary tables
``cos, sin float32 [max_pos, D // 2]``. Program ``(b, kv_head, split)`` handles all ``H // kvH`` query
heads of its kv head, so each cache byte is read once whatever the GQA ratio (GQA/MQA aware).

The new token's k/v are written to the cache at ``seq_lens[b]`` by split 0 only; every split that
covers that position takes k/v from registers instead of memory, so no split reads a position another
program is writing (no intra-launch race).

Parameter order is: input pointers, int32 scalars, output pointers, constexprs: the order in which a
TensorRT AOT plugin passes arguments (inputs, extra scalar args, outputs), so the very same kernel is
what ``trt/plugins.py`` compiles. State updated in place (caches, split-K scratch) appears twice, as an
input and as the aliased output, the way TensorRT plugins express in-place updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import check_kv_cache

__all__ = ["DecodeWorkspace", "decode_attention", "default_num_splits", "DECODE_NUM_WARPS"]

# 4 warps: 168 registers and 8 B spilled; 8 warps would spill nothing (127 registers) but hold 2 blocks
# per SM, not 3 (ptxas -v, benchmarks/results/kernel_resources.md). Untimed: the decode sweep has both.
DECODE_NUM_WARPS = 4


@triton.jit
def _decode_attention_kernel(
    Q, K_new, V_new, Seq_lens, Cos, Sin, K_cache, V_cache,  # inputs
    Partial_O, Partial_ML, Counters,  # split-K scratch (counters must start at 0; left at 0)
    num_kv_heads, max_seq,  # int32 scalars
    Out, K_cache_out, V_cache_out, Partial_O_out, Partial_ML_out, Counters_out,  # outputs; all but Out
    # alias the input of the same name (in-place state): reads go through the input, writes through the output
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    num_heads = num_kv_heads * GROUP

    L = tl.load(Seq_lens + b)  # new token goes to position L; attend over L + 1 positions
    offs_d = tl.arange(0, HALF)
    offs_dv = tl.arange(0, HEAD_DIM)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h

    # rotary at position L (rotate_half: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]); q also pre-scaled
    # by sm_scale * log2(e) so the softmax runs on exp2.
    c = tl.load(Cos + L * HALF + offs_d)
    s = tl.load(Sin + L * HALF + offs_d)
    q_ptr = Q + (b * num_heads + heads[:, None]) * HEAD_DIM + offs_d[None, :]
    q1 = tl.load(q_ptr, mask=h_mask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF, mask=h_mask[:, None], other=0.0).to(tl.float32)
    dt = K_cache.dtype.element_ty
    qr1 = ((q1 * c[None, :] - q2 * s[None, :]) * QK_SCALE).to(dt)
    qr2 = ((q2 * c[None, :] + q1 * s[None, :]) * QK_SCALE).to(dt)

    kv_row = b * num_kv_heads + kvh
    k1 = tl.load(K_new + kv_row * HEAD_DIM + offs_d).to(tl.float32)
    k2 = tl.load(K_new + kv_row * HEAD_DIM + HALF + offs_d).to(tl.float32)
    kr1 = (k1 * c - k2 * s).to(dt)  # rounded to the cache dtype: identical to what later steps read
    kr2 = (k2 * c + k1 * s).to(dt)
    vn = tl.load(V_new + kv_row * HEAD_DIM + offs_dv).to(dt)

    cache_base = kv_row * max_seq * HEAD_DIM
    if split == 0:
        tl.store(K_cache_out + cache_base + L * HEAD_DIM + offs_d, kr1)
        tl.store(K_cache_out + cache_base + L * HEAD_DIM + HALF + offs_d, kr2)
        tl.store(V_cache_out + cache_base + L * HEAD_DIM + offs_dv, vn)

    # This sequence's own L + 1 positions are shared out over the splits (whole BLOCK_N blocks), so
    # a short sequence in a long cache still keeps every split busy, with no host-side sync.
    chunk = tl.cdiv(tl.cdiv(L + 1, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L + 1)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cached = offs_n < L
        is_new = (offs_n == L)[:, None]
        row = cache_base + offs_n[:, None] * HEAD_DIM
        kc1 = tl.load(K_cache + row + offs_d[None, :], mask=cached[:, None], other=0.0)
        kc2 = tl.load(K_cache + row + HALF + offs_d[None, :], mask=cached[:, None], other=0.0)
        kc1 = tl.where(is_new, kr1[None, :], kc1)
        kc2 = tl.where(is_new, kr2[None, :], kc2)
        qk = tl.dot(qr1, tl.trans(kc1), input_precision=DOT_PRECISION)
        qk = tl.dot(qr2, tl.trans(kc2), acc=qk, input_precision=DOT_PRECISION)
        qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vc = tl.load(V_cache + row + offs_dv[None, :], mask=cached[:, None], other=0.0)
        vc = tl.where(is_new, vn[None, :], vc)
        acc = tl.dot(p.to(dt), vc, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out_ptr = Out + (b * num_heads + heads[:, None]) * HEAD_DIM + offs_dv[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=h_mask[:, None])
    else:
        # Publish this split's partial (unnormalised acc, running max, running sum) ...
        part = (b * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(Partial_O_out + part[:, None] * HEAD_DIM + offs_dv[None, :], acc, mask=h_mask[:, None])
        tl.store(Partial_ML_out + part * 2, m_i, mask=h_mask)
        tl.store(Partial_ML_out + part * 2 + 1, l_i, mask=h_mask)
        # ... then count arrivals. The barrier orders every thread's stores before the (acq_rel, gpu
        # scope) atomic; whoever sees NUM_SPLITS - 1 arrived last and all partials are visible to it.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters_out + kv_row, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            offs_s = tl.arange(0, NUM_SPLITS)
            parts = (b * num_heads + heads[:, None]) * NUM_SPLITS + offs_s[None, :]  # [BLOCK_H, S]
            # .cg: read from L2, never a stale L1 line written by another SM.
            m_s = tl.load(Partial_ML + parts * 2, mask=h_mask[:, None], other=0.0, cache_modifier=".cg")
            l_s = tl.load(Partial_ML + parts * 2 + 1, mask=h_mask[:, None], other=0.0, cache_modifier=".cg")
            m_max = tl.max(m_s, 1)
            w = tl.exp2(m_s - m_max[:, None])  # empty splits have m = -inf -> weight 0
            denom = tl.where(h_mask, tl.sum(w * l_s, 1), 1.0)  # padded head rows: avoid 0/0
            o = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
            for si in tl.static_range(NUM_SPLITS):
                w_si = tl.sum(tl.where(offs_s[None, :] == si, w, 0.0), 1)
                p_o = tl.load(Partial_O + ((b * num_heads + heads[:, None]) * NUM_SPLITS + si) * HEAD_DIM
                              + offs_dv[None, :], mask=h_mask[:, None], other=0.0, cache_modifier=".cg")
                o += w_si[:, None] * p_o
            tl.store(out_ptr, (o / denom[:, None]).to(Out.dtype.element_ty), mask=h_mask[:, None])
            tl.store(Counters_out + kv_row, 0)  # ready for the next launch without a memset


@dataclass
class DecodeWorkspace:
    """Scratch for split-K: partial outputs, (max, sum) pairs and per-(sequence, kv head) counters.

    Owned by the caller (the runtime keeps one per batch size, like the KV cache) so a decode step
    allocates nothing and can be captured in a CUDA graph. ``counters`` must be zero when created;
    the kernel returns every counter to zero.
    """

    partial_o: torch.Tensor  # float32 [B, H, S, D]
    partial_ml: torch.Tensor  # float32 [B, H, S, 2]
    counters: torch.Tensor  # int32 [B, kvH]

    @classmethod
    def allocate(
        cls, batch: int, num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int,
        device: torch.device | str,
    ) -> "DecodeWorkspace":
        return cls(
            torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=device),
            torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device),
        )

    def fits(self, batch: int, num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int) -> bool:
        return (
            tuple(self.partial_o.shape) == (batch, num_heads, num_splits, head_dim)
            and tuple(self.counters.shape) == (batch, num_kv_heads)
        )


def default_num_splits(batch: int, num_kv_heads: int, max_seq: int, block_n: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM, a power of two, never more than the cache has blocks."""
    if device.type != "cuda":
        return 1 if max_seq <= 4 * block_n else 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-2 * sms // (batch * num_kv_heads)))
    splits = 1 << (want - 1).bit_length()
    return max(1, min(splits, triton.next_power_of_2(triton.cdiv(max_seq, block_n)), 64))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    workspace: DecodeWorkspace | None = None,
    out: torch.Tensor | None = None,
    num_warps: int = DECODE_NUM_WARPS,
) -> torch.Tensor:
    """One decode step for every sequence of the batch; mutates ``k_cache``/``v_cache`` in place.

    Returns attention output ``[B, H, D]`` in ``q.dtype``. ``num_splits`` must be a power of two
    (default: :func:`default_num_splits`). Does not synchronise with the device (no ``.item()``), so it
    can be captured in a CUDA graph when ``workspace`` and ``out`` are given.
    """
    B, H, D = q.shape
    kvH = k.shape[1]
    S = k_cache.shape[2]
    if H % kvH or k.shape != (B, kvH, D) or v.shape != (B, kvH, D):
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    check_kv_cache(k_cache, v_cache, B, kvH, D)
    if cos.shape[-1] != D // 2:
        raise ValueError(f"rotary tables must be [max_pos, {D // 2}], got {tuple(cos.shape)}")
    group = H // kvH
    num_splits = num_splits or default_num_splits(B, kvH, S, block_n, q.device)
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if workspace is None and num_splits > 1:
        workspace = DecodeWorkspace.allocate(B, H, kvH, D, num_splits, q.device)
    if workspace is not None and num_splits > 1 and not workspace.fits(B, H, kvH, D, num_splits):
        raise ValueError("workspace was allocated for a different batch/heads/num_splits")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped like q")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    # scratch pointers are never touched when num_splits == 1
    scratch = (workspace.partial_o, workspace.partial_ml, workspace.counters) if workspace else (out, out, out)
    _decode_attention_kernel[(B, kvH, num_splits)](
        q.contiguous(), k.contiguous(), v.contiguous(), seq_lens.to(torch.int32), cos.float().contiguous(),
        sin.float().contiguous(), k_cache, v_cache, *scratch,
        kvH, S,
        out, k_cache, v_cache, *scratch,
        HEAD_DIM=D, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        NUM_SPLITS=num_splits, QK_SCALE=scale * 1.4426950408889634,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", num_warps=num_warps,
    )
    return out

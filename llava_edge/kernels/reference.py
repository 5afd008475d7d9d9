"""Plain PyTorch/numpy references for the Triton kernels, and the int4 packing contract.

Everything here is deliberately naive (float32 math, explicit loops over the batch) so that it is
obviously right; the kernels are tested against it. Other modules (quantization, export, runtime
tests) import ``pack_int4`` / ``unpack_int4`` from here so the packing is defined exactly once.

Conventions shared with the kernels:

* KV cache: ``k_cache, v_cache: [batch, num_kv_heads, max_seq, head_dim]`` (the ONNX decoder's
  ``past_key_values`` layout), preallocated and updated in place.
* ``seq_lens`` (int32 ``[batch]``): tokens already in the cache before a decode step.
* Rotary: LLaMA "rotate_half" (first half / second half of ``head_dim``, not interleaved), tables
  ``cos, sin: [max_pos, head_dim // 2]`` in float32.
* int4: onnxruntime ``MatMulNBits`` layout, symmetric, see :func:`pack_int4`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..packing import pack, unpack

__all__ = [
    "rope_cos_sin",
    "apply_rope",
    "decode_attention_ref",
    "prefill_attention_ref",
    "pack_int4",
    "unpack_int4",
    "int4_matmul_ref",
]


# ----------------------------------------------------------------------------------------- rotary
def rope_cos_sin(
    max_pos: int, head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_pos, head_dim // 2]`` (float32) as HF ``LlamaRotaryEmbedding`` builds them.

    Tables rather than in-kernel ``pow``/``sin`` so a model with rope scaling only has to change the
    table, never the kernel.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return (
        torch.cos(angles).to(torch.float32).to(device),
        torch.sin(angles).to(torch.float32).to(device),
    )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half rotary in float32. ``x: [..., D]``; ``cos, sin`` broadcastable to ``[..., D//2]``."""
    x = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# -------------------------------------------------------------------------------------- attention
def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """One decode step: rotary on q/k, append k/v at ``seq_lens[b]`` (in place), attend over the cache.

    ``q: [B, H, D]``, ``k, v: [B, kvH, D]`` (the new token, before rotary). Returns ``[B, H, D]`` in
    ``q.dtype``; mutates ``k_cache``/``v_cache`` exactly at position ``seq_lens[b]`` of each sequence.
    """
    B, H, D = q.shape
    kvH = k.shape[1]
    group = H // kvH
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        pos = int(seq_lens[b])
        c, s = cos[pos].float(), sin[pos].float()
        k_cache[b, :, pos] = apply_rope(k[b], c, s).to(k_cache.dtype)
        v_cache[b, :, pos] = v[b].to(v_cache.dtype)
        keys = k_cache[b, :, : pos + 1].float().repeat_interleave(group, dim=0)  # [H, L+1, D]
        vals = v_cache[b, :, : pos + 1].float().repeat_interleave(group, dim=0)
        qr = apply_rope(q[b], c, s)  # [H, D]
        p = torch.softmax(torch.einsum("hd,hnd->hn", qr, keys) * scale, dim=-1)
        out[b] = torch.einsum("hn,hnd->hd", p, vals).to(q.dtype)
    return out


def prefill_attention_ref(
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
) -> torch.Tensor:
    """Causal attention over right-padded prompts, writing rotated k and v into the cache.

    ``q: [B, T, H, D]``, ``k, v: [B, T, kvH, D]``. Token ``t`` of sequence ``b`` sits at cache
    position ``start_pos[b] + t`` (``start_pos`` defaults to 0; a non-zero start reuses the prefix
    already in the cache). Rows ``t >= prompt_lens[b]`` are padding: their output is defined as 0 and
    the cache is not written there.
    """
    B, T, H, D = q.shape
    kvH = k.shape[2]
    group = H // kvH
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(prompt_lens[b])
        s0 = int(start_pos[b]) if start_pos is not None else 0
        if n == 0:
            continue
        c, s = cos[s0 : s0 + n, None, :].float(), sin[s0 : s0 + n, None, :].float()
        k_cache[b, :, s0 : s0 + n] = apply_rope(k[b, :n], c, s).transpose(0, 1).to(k_cache.dtype)
        v_cache[b, :, s0 : s0 + n] = v[b, :n].transpose(0, 1).to(v_cache.dtype)
        keys = k_cache[b, :, : s0 + n].float().repeat_interleave(group, dim=0)  # [H, S, D]
        vals = v_cache[b, :, : s0 + n].float().repeat_interleave(group, dim=0)
        qr = apply_rope(q[b, :n], c, s).transpose(0, 1)  # [H, n, D]
        scores = torch.einsum("hqd,hkd->hqk", qr, keys) * scale
        q_pos = torch.arange(s0, s0 + n)[:, None]
        k_pos = torch.arange(s0 + n)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[b, :n] = torch.einsum("hqk,hkd->hqd", p, vals).transpose(0, 1).to(q.dtype)
    return out


# ------------------------------------------------------------------------------------------- int4
def pack_int4(w: np.ndarray | torch.Tensor, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``W [N, K]`` (round to nearest) and pack it with ``packing.pack``: the
    onnxruntime ``MatMulNBits`` layout (symmetric).

    ``scale = max|W_group| / 7`` (so the largest weight maps to +-7 and ``-8`` is only reached by
    rounding ties), ``q = clamp(round(W / scale), -8, 7)``, stored unsigned as ``q + 8``; byte ``j`` of
    a row holds element ``2j`` in the LOW nibble and ``2j + 1`` in the HIGH nibble.

    Returns ``qweight uint8 [N, K // 2]`` and ``scales float16 [N, K // group_size]``.
    """
    w = w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
    n, k = w.shape
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size} in (32, 64, 128)")
    groups = w.reshape(n, k // group_size, group_size)
    scales = (np.abs(groups).max(axis=-1) / 7.0).astype(np.float16)
    safe = np.where(scales == 0, np.float16(1), scales).astype(np.float32)
    q = np.clip(np.rint(groups / safe[..., None]), -8, 7).astype(np.int8).reshape(n, k)
    return pack(q, 4), scales


def unpack_int4(
    qweight: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor, group_size: int
) -> np.ndarray | torch.Tensor:
    """Dequantize ``qweight [N, K//2]`` + ``scales [N, K//g]`` to ``W [N, K]`` float32.

    Returns the same array type it was given (numpy in, numpy out; torch in, torch out).
    """
    if isinstance(qweight, torch.Tensor):
        s = scales.float() if isinstance(scales, torch.Tensor) else torch.as_tensor(scales).float()
        qw = qweight.to(torch.int32)
        q = torch.stack([qw & 0xF, qw >> 4], dim=-1).reshape(qw.shape[0], -1) - 8
        return q.float() * s.to(q.device).repeat_interleave(group_size, dim=1)
    q = unpack(np.asarray(qweight), 4)
    return q.astype(np.float32) * np.repeat(np.asarray(scales, np.float32), group_size, axis=1)


def int4_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``y = x @ dequant(W)^T`` in float32, returned in ``x.dtype``. ``x: [..., K]``."""
    w = unpack_int4(qweight, scales, group_size)
    return (x.float() @ w.T).to(x.dtype)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int, kv_heads: int, head_dim: int) -> None:
    """The cache contract every kernel relies on: [B, kvH, max_seq, D], contiguous (written in place),
    head_dim a power of two >= 32 (one tile of the head dimension)."""
    S = k_cache.shape[2] if k_cache.dim() == 4 else -1
    if k_cache.shape != (batch, kv_heads, S, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache must be [B, kvH, max_seq, D], got {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV cache must be contiguous (it is updated in place)")
    if head_dim & (head_dim - 1) or head_dim < 32:
        raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim}")

"""``torch.library`` custom ops over the Triton kernels, plus a LLaMA attention block built from them.

Why custom ops and not plain calls: registered ops (with fake implementations and declared cache
mutation) survive ``torch.compile`` / ``torch.export`` without graph breaks, so the kernels can be
dropped into a real decoder forward on a GPU and compared with the eager model token for token.

Ops (namespace ``llava_edge``):

* ``decode_attention(q, k, v, k_cache!, v_cache!, seq_lens, cos, sin, sm_scale?, num_splits) -> out``
* ``prefill_attention(q, k, v, k_cache!, v_cache!, prompt_lens, cos, sin, start_pos?, sm_scale?) -> out``
* ``int4_linear(x, qweight, scales, group_size) -> y``

``num_splits = 0`` means "pick for this GPU".
"""

from __future__ import annotations

import torch

from .decode_attention import decode_attention as _decode
from .int4_matmul import int4_matmul as _int4_matmul
from .prefill_attention import prefill_attention as _prefill

__all__ = ["decode_attention_op", "prefill_attention_op", "int4_linear_op", "llama_attention_forward"]


@torch.library.custom_op("llava_edge::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    seq_lens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sm_scale: float | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    return _decode(q, k, v, k_cache, v_cache, seq_lens, cos, sin, sm_scale=sm_scale, num_splits=num_splits or None)


@decode_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, seq_lens, cos, sin, sm_scale=None, num_splits=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_edge::prefill_attention", mutates_args=("k_cache", "v_cache"))
def prefill_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    prompt_lens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    return _prefill(q, k, v, k_cache, v_cache, prompt_lens, cos, sin, start_pos=start_pos, sm_scale=sm_scale)


@prefill_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, prompt_lens, cos, sin, start_pos=None, sm_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("llava_edge::int4_linear", mutates_args=())
def int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return _int4_matmul(x, qweight, scales, group_size)


@int4_linear_op.register_fake
def _(x, qweight, scales, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def llama_attention_forward(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    decode: bool,
) -> torch.Tensor:
    """A LLaMA self-attention block (``q_proj/k_proj/v_proj/o_proj``, as in HF ``LlamaAttention``) on
    the fused kernels: one decode step (``hidden [B, 1, E]``, ``lens`` = tokens already cached) or a
    prefill (``hidden [B, T, E]`` right-padded, ``lens`` = prompt lengths). Explicit ``decode`` because
    a one-token prompt and a decode step have the same shape but different ``lens`` meanings.
    Duck-typed (no transformers import) so a GPU check can pass a real decoder layer's ``self_attn``.
    """
    B, T, _ = hidden.shape
    q = attn.q_proj(hidden).view(B, T, num_heads, -1)
    k = attn.k_proj(hidden).view(B, T, num_kv_heads, -1)
    v = attn.v_proj(hidden).view(B, T, num_kv_heads, -1)
    if decode:
        if T != 1:
            raise ValueError(f"a decode step takes one token per sequence, got T={T}")
        out = decode_attention_op(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, lens, cos, sin)[:, None]
    else:
        out = prefill_attention_op(q, k, v, k_cache, v_cache, lens, cos, sin)
    return attn.o_proj(out.reshape(B, T, -1))

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
from .reference import rope_cos_sin

__all__ = ["decode_attention_op", "prefill_attention_op", "int4_linear_op", "llama_attention_forward",
           "llama_greedy_generate"]


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


@torch.no_grad()
def llama_greedy_generate(
    model: torch.nn.Module, input_ids: torch.Tensor, prompt_lens: torch.Tensor, max_new_tokens: int,
    max_seq: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy generation through a real HF ``LlamaForCausalLM`` with every attention on our kernels.

    The model's own embeddings, norms, MLPs and head run as they are; each layer's ``self_attn``
    goes through :func:`llama_attention_forward` with a KV cache we own (ragged prefill, then split-K
    decode steps). ``input_ids [B, T]`` right-padded, ``prompt_lens int32 [B]``. Returns the new
    tokens ``[B, max_new_tokens]`` and each step's next-token logits ``[B, vocab]`` (step 0 = the
    prompt's last real token), to compare with the model's own forward token for token.
    Duck-typed on the HF module layout (``model.model.layers[i].self_attn`` ...), no transformers import.
    """
    cfg = model.config
    B, T = input_ids.shape
    H, kvH = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    S = max_seq or T + max_new_tokens
    dev, dt = input_ids.device, model.lm_head.weight.dtype
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r}: only plain rotary tables are built here")
    cos, sin = rope_cos_sin(S, D, theta, device=dev)
    layers = model.model.layers
    caches = [(torch.zeros(B, kvH, S, D, device=dev, dtype=dt), torch.zeros(B, kvH, S, D, device=dev, dtype=dt))
              for _ in layers]
    lens = prompt_lens.to(device=dev, dtype=torch.int32)

    def forward(ids: torch.Tensor, decode: bool) -> torch.Tensor:
        h = model.model.embed_tokens(ids)
        for layer, (kc, vc) in zip(layers, caches):
            a = llama_attention_forward(layer.self_attn, layer.input_layernorm(h), kc, vc, lens, cos, sin, H, kvH,
                                        decode)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(model.model.norm(h))

    logits = forward(input_ids, decode=False)
    step_logits = [logits[torch.arange(B, device=dev), lens.long() - 1]]
    tokens = []
    for i in range(max_new_tokens):
        nxt = step_logits[-1].argmax(-1)
        tokens.append(nxt)
        if i == max_new_tokens - 1:
            break
        step_logits.append(forward(nxt[:, None], decode=True)[:, 0])
        lens = lens + 1
    return torch.stack(tokens, 1), step_logits

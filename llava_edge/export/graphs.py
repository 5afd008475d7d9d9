"""The three graphs of a package, as small torch modules written for export.

The decoder is our own LLaMA forward over the checkpoint's weights, not transformers' module: that
keeps the traced graph free of cache classes and mask helpers that change between transformers
releases, gives every weight a stable, readable initializer name (the quantizer finds its MatMuls by
them), and leaves one obvious place to swap in a fused attention op. Its output is checked against
transformers on every export (verify.py), so the re-implementation cannot drift silently.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """pixel_values [B,3,H,W] -> image_features [B,N,hidden]: CLIP tower, feature layer, select, projector."""

    def __init__(self, llava, feature_layer: int | list[int], strategy: str):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.feature_layer = feature_layer
        self.strategy = strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        hs = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            hs = [h[:, 1:] for h in hs]
        feats = hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)
        return self.projector(feats)


class TokenEmbedding(nn.Module):
    """input_ids [B,T] -> inputs_embeds [B,T,hidden]. Its own graph so that the decoder takes embeddings
    (image features are spliced in between) and the embedding table is stored once."""

    def __init__(self, llava):
        super().__init__()
        self.embed_tokens = llava.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        a = hf_layer.self_attn
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = a.q_proj, a.k_proj, a.v_proj, a.o_proj
        self.mlp = hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        rep = self.num_heads // self.num_kv_heads
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        # Scores and softmax in fp32 whatever the graph dtype: fp16 overflows where the mask adds its
        # large negative, and a NaN in a padding row would reach real rows through the cache.
        scores = torch.matmul(q, kr.transpose(2, 3)).float() * (self.head_dim**-0.5) + mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        attn = torch.matmul(probs, vr).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        x = x + self.o_proj(attn)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Decoder(nn.Module):
    """inputs_embeds, attention_mask [B,P+T], position_ids [B,T], past k/v [B,kvH,P,D] per layer ->
    logits [B,T,V] and present k/v [B,kvH,P+T,D]. Mask semantics are transformers': 1 = real token."""

    def __init__(self, llava):
        super().__init__()
        lm = llava.model.language_model
        cfg = llava.config.text_config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = nn.ModuleList(
            DecoderLayer(layer, self.num_heads, self.num_kv_heads, self.head_dim) for layer in lm.layers
        )
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.lm_head = llava.lm_head
        self.vocab_size = llava.lm_head.out_features

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        b, t, _ = inputs_embeds.shape
        total = attention_mask.shape[1]
        past_len = total - t
        cos, sin = self.rotary(inputs_embeds, position_ids)
        cos, sin = cos.unsqueeze(1).to(inputs_embeds.dtype), sin.unsqueeze(1).to(inputs_embeds.dtype)
        # Causal + padding mask, additive, fp32. A finite negative (not -inf) keeps fully-masked rows
        # (queries at left-padding positions) finite.
        q_pos = torch.arange(t, device=inputs_embeds.device).unsqueeze(1) + past_len
        k_pos = torch.arange(total, device=inputs_embeds.device).unsqueeze(0)
        allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).unsqueeze(1)
        x = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        logits = self.lm_head(self.norm(x))
        return (logits, *presents)

"""The three graphs of a package, as small torch modules written for export.

The decoder is our own forward of the LLaMA family (LLaMA, Mistral, Qwen2 with its q/k/v bias, Phi-3 with
its fused projections split) over the checkpoint's weights, not transformers' module: that
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


def split_linear(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """A fused projection (Phi-3's qkv_proj, gate_up_proj) as separate Linears over copies of its rows.

    Every later stage (the quantizer, the fast decoder, TensorRT weight names) knows one layout,
    `q_proj/k_proj/v_proj` and `gate_proj/up_proj`; splitting is exact (rows of one matrix)."""
    out, start = [], 0
    for n in sizes:
        lin = nn.Linear(fused.in_features, n, bias=fused.bias is not None, device="meta")
        lin.weight = nn.Parameter(fused.weight.detach()[start : start + n].clone(), requires_grad=False)
        if fused.bias is not None:
            lin.bias = nn.Parameter(fused.bias.detach()[start : start + n].clone(), requires_grad=False)
        out.append(lin)
        start += n
    return out


class ConcatLinear(nn.Module):
    """Stands where a fused projection was: the concatenated outputs of its split parts, so that
    transformers' own forward runs unchanged on the split weights. The parts are registered on the
    parent module (q_proj, ...), not here, so every weight has one name."""

    def __init__(self, *parts: nn.Linear):
        super().__init__()
        self._parts = tuple(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self._parts], dim=-1)


def unfuse_projections(model) -> None:
    """Phi-3 layers get q/k/v_proj and gate/up_proj (split from qkv_proj, gate_up_proj), which become
    ConcatLinears over them: one Linear layout for export, quantization and the fast decoder."""
    cfg = model.config.text_config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for layer in model.model.language_model.layers:
        a, m = layer.self_attn, layer.mlp
        if hasattr(a, "qkv_proj") and not hasattr(a, "q_proj"):
            a.q_proj, a.k_proj, a.v_proj = split_linear(
                a.qkv_proj, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            a.qkv_proj = ConcatLinear(a.q_proj, a.k_proj, a.v_proj)
        if hasattr(m, "gate_up_proj") and not hasattr(m, "gate_proj"):
            inter = m.gate_up_proj.out_features // 2
            m.gate_proj, m.up_proj = split_linear(m.gate_up_proj, [inter, inter])
            m.gate_up_proj = ConcatLinear(m.gate_proj, m.up_proj)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): LLaMA's MLP, and Phi-3's once its gate_up_proj is split."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def layer_projections(hf_layer, num_heads: int, num_kv_heads: int, head_dim: int):
    """(q, k, v, o, mlp) of one transformers decoder layer in the split layout, whatever the family:
    LLaMA/Mistral/Qwen2 (q/k/v, Qwen2 with bias) as they are, Phi-3's fused projections split."""
    a, m = hf_layer.self_attn, hf_layer.mlp
    if hasattr(a, "q_proj"):
        q, k, v = a.q_proj, a.k_proj, a.v_proj
    else:
        q, k, v = split_linear(a.qkv_proj, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
    act = getattr(m, "act_fn", None) or m.activation_fn
    if hasattr(m, "gate_proj"):
        mlp = GatedMLP(m.gate_proj, m.up_proj, m.down_proj, act)
    else:
        inter = m.gate_up_proj.out_features // 2
        gate, up = split_linear(m.gate_up_proj, [inter, inter])
        mlp = GatedMLP(gate, up, m.down_proj, act)
    return q, k, v, a.o_proj, mlp


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first cos.shape[-1] dims (all of them unless the config has a partial_rotary_factor)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, keep = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, keep], dim=-1)


def rotary_inv_freq(hf_rotary) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of a transformers rotary module, as it computes below
    original_max_position_embeddings: `original_inv_freq` is the init-time table (longrope's short
    factors, dynamic NTK's unscaled one), which the context cap (checkpoint.context_limit) keeps us in."""
    inv = getattr(hf_rotary, "original_inv_freq", None)
    if inv is None:
        inv = hf_rotary.inv_freq
    return inv.detach().float().clone(), float(getattr(hf_rotary, "attention_scaling", 1.0))


class Rotary(nn.Module):
    """cos/sin [B,T,rotary_dim] for position_ids, as transformers' rotary modules compute them (fp32 product,
    duplicated halves, attention scaling), without their data-dependent table switch (not traceable)."""

    def __init__(self, hf_rotary):
        super().__init__()
        inv, self.scaling = rotary_inv_freq(hf_rotary)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.mlp = layer_projections(
            hf_layer, num_heads, num_kv_heads, head_dim)
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
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
        self.rotary = Rotary(lm.rotary_emb)
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

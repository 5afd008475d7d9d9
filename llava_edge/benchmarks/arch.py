"""Named LLaVA architectures and random-weight checkpoints of their exact shape.

Speed does not depend on weight values, so speed work does not need the real weights (which no test
machine can download anyway). `build_random_checkpoint("edge-1b", dir)` writes a llava-hf directory
that `load_checkpoint` / `export_package` / transformers read like a real one: same layer count, widths,
heads, GQA ratio, vocabulary and image token count as the named model.

Weights are written in fp16 (half the disk and the write time; the loader upcasts to fp32). The
tokenizer is the factory's small trained BPE: the model's vocabulary (32000 rows of embedding and
lm_head, which matter for speed) is larger than the tokenizer's, as in real checkpoints padded to a
multiple of 64. Ids the tokenizer does not know decode to nothing, which is fine for timing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UsageError


@dataclass(frozen=True)
class ArchSpec:
    """The shape of a LLaVA model: CLIP vision tower + projector + LLaMA decoder."""

    name: str
    # vision tower (CLIP ViT)
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    # decoder (LLaMA)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int
    max_positions: int
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def decoder_params(self) -> int:
        """Parameters of the decoder (embedding and lm_head included)."""
        kv = self.kv_heads * self.head_dim
        attn = self.hidden * (self.hidden * 2 + kv * 2)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab_size * self.hidden + self.hidden

    def vision_params(self) -> int:
        per_layer = 4 * self.vision_hidden**2 + 2 * self.vision_hidden * 4 * self.vision_hidden
        patches = 3 * self.patch_size**2 * self.vision_hidden
        projector = self.vision_hidden * self.hidden + self.hidden * self.hidden
        return self.vision_layers * per_layer + patches + projector

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(decoder_params=self.decoder_params(), vision_params=self.vision_params(),
                 num_image_tokens=self.num_image_tokens, head_dim=self.head_dim)
        return d


ARCHS: dict[str, ArchSpec] = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (LLaMA-2-7B shape, MHA), 576 image tokens.
    "llava-1.5-7b": ArchSpec(
        "llava-1.5-7b", image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab_size=32064,
        max_positions=4096, description="CLIP ViT-L/14-336 + 7B LLaMA (LLaVA-1.5-7B)",
    ),
    # The edge shape: TinyLlama-1.1B decoder (GQA 32/4 heads) + CLIP ViT-B/16-224, 196 image tokens.
    "edge-1b": ArchSpec(
        "edge-1b", image_size=224, patch_size=16, vision_hidden=768, vision_layers=12, vision_heads=12,
        hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab_size=32000,
        max_positions=2048, description="CLIP ViT-B/16-224 + TinyLlama-1.1B (GQA 32q/4kv)",
    ),
    # A quick shape between the unit-test models and the edge model, for smoke runs of the harness.
    "small-100m": ArchSpec(
        "small-100m", image_size=224, patch_size=32, vision_hidden=384, vision_layers=4, vision_heads=6,
        hidden=768, layers=8, heads=12, kv_heads=4, intermediate=2048, vocab_size=32000,
        max_positions=1024, description="tiny CLIP + 100M LLaMA-like decoder (GQA), for smoke runs",
    ),
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def _llava_config(arch: ArchSpec, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_hidden * 4,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, projection_dim=arch.vision_hidden,
    )
    tc = LlamaConfig(
        hidden_size=arch.hidden, intermediate_size=arch.intermediate, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=image_token_id,
        vision_feature_layer=arch.vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """fp16 weights with the factory's scale (1/sqrt(fan_in)): logits are not flat, so greedy
    decoding is not dominated by ties, and activations stay finite through 32 layers."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            t = 0.02 * torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) * (max(1, p.shape[-1]) ** -0.5)
        state[name] = t.to(torch.float16)
    return state


def build_random_checkpoint(arch: str | ArchSpec, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a llava-hf checkpoint directory of the given architecture with random fp16 weights.

    The model is built on the meta device, so the only memory used is the fp16 state dict itself
    (2.2 GB for edge-1b, 14 GB for llava-1.5-7b). Returns out_dir.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    from ..export.factory import IMAGE_TOKEN, LLAVA_HF_CHAT_TEMPLATE, TinySpec, _image_processor, build_tokenizer

    spec = get_arch(arch) if isinstance(arch, str) else arch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(384, with_image_token=True)
    image_token_id = tok.token_to_id(IMAGE_TOKEN)
    config = _llava_config(spec, image_token_id)
    config.dtype = "float16"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = _random_state(model, seed)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    config.save_pretrained(out)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    proc_spec = TinySpec(image_size=spec.image_size, patch_size=spec.patch_size)
    proc = LlavaProcessor(
        image_processor=_image_processor(proc_spec, llava_pad=True), tokenizer=fast,
        patch_size=spec.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=LLAVA_HF_CHAT_TEMPLATE,
    )
    proc.save_pretrained(out)
    (out / "llava_edge_arch.json").write_text(json.dumps({"arch": spec.as_dict(), "seed": seed}, indent=2))
    return out

"""Small random-weight LLaVA checkpoints, written to disk in the real layouts.

Tests and the demo cannot download anything, so they build their checkpoints here: a real tokenizer
trained with `tokenizers` on a fixed corpus, a vision tower (CLIP or SigLIP), a decoder of one of the
families people deploy (LLaMA, Mistral, Qwen2, Phi-3; `TinySpec.decoder`), plain LLaVA or LLaVA-NeXT
(anyres, `TinySpec.model`), and the files a user would have on disk, in either layout:

- "llava-hf": what `LlavaForConditionalGeneration.save_pretrained` + `LlavaProcessor.save_pretrained`
  write (config.json, model.safetensors, tokenizer.json, preprocessor/processor configs);
- "original": the LLaVA repo's `LlavaLlamaForCausalLM` directory (mm_* config keys, `model.mm_projector`
  weights, no `<image>` token in the tokenizer) with `mm_vision_tower` pointing at a separate local CLIP
  directory.

The builder returns the in-memory `LlavaForConditionalGeneration` it wrote, so tests can compare our
loader's reading of the files against the model that produced them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"

# Special tokens per decoder family, as the real tokenizers have them (ids 0.. in this order), and
# which of them are bos/eos/pad/unk. Qwen2 has no bos (its post-processor adds nothing).
FAMILY_TOKENS: dict[str, dict] = {
    "llama": {"specials": SPECIAL_TOKENS, "bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "mistral": {"specials": SPECIAL_TOKENS, "bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "qwen2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "unk": None},
    "phi3": {"specials": [*SPECIAL_TOKENS, "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"], "bos": "<s>",
             "eos": "<|end|>", "pad": "<pad>", "unk": "<unk>"},
}

_WORDS = (
    "the a an is are was what where which who how many colour color red green blue yellow black white "
    "circle square triangle star shape shapes left right top bottom middle center picture image photo "
    "describe there in on of and or to with small large big little count number one two three four five "
    "six seven eight nine ten cat dog robot kiosk table chair person car tree sky sun house door window "
    "USER ASSISTANT : ? . , ! yes no please tell me about this that it see do you can could would "
    "A chat between curious human artificial intelligence assistant gives helpful detailed polite answers "
    "questions question answer"
).split()


def _corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(0, len(_WORDS), (int(torch.randint(4, 14, (1,), generator=g)),), generator=g)
        lines.append(" ".join(_WORDS[i] for i in idx.tolist()))
    lines += ["USER: <image>\nWhat is in the picture? ASSISTANT: A red circle.</s>"] * 5
    return lines


def build_tokenizer(vocab_size: int = 384, with_image_token: bool = True, family: str = "llama") -> Tokenizer:
    """A byte-level BPE with the family's specials (LLaMA-like: <s> prepended by the post-processor)."""
    fam = FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE(unk_token=fam["unk"]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fam["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if with_image_token:
        tok.add_special_tokens([IMAGE_TOKEN])
    if fam["bos"]:
        bos = tok.token_to_id(fam["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam['bos']} $A", pair=f"{fam['bos']} $A {fam['bos']} $B", special_tokens=[(fam["bos"], bos)]
        )
    return tok


def _fast_tokenizer(tok: Tokenizer, family: str = "llama"):
    from transformers import PreTrainedTokenizerFast

    fam = FAMILY_TOKENS[family]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"],
                                   unk_token=fam["unk"], pad_token=fam["pad"])


def _save_hf_tokenizer(tok: Tokenizer, out: Path, chat_template: str | None = None) -> None:
    fast = _fast_tokenizer(tok)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)


@dataclass
class TinySpec:
    """Dimensions of a tiny LLaVA. Defaults keep a full export + test run to seconds."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 128
    max_positions: int = 256
    vocab_size: int = 384
    projector: str = "mlp2x_gelu"  # or "linear" (LLaVA v1)
    vision_feature_layer: int = -2
    select_strategy: str = "default"
    pad_to_square: bool = True
    seed: int = 0
    decoder: str = "llama"  # llama / mistral / qwen2 / phi3
    vision: str = "clip"  # clip / siglip (no CLS token)
    model: str = "llava"  # llava / llava_next (anyres tiles)
    sliding_window: int | None = None  # Mistral / Phi-3 attention window
    rope_parameters: dict | None = None  # e.g. Phi-3 longrope
    grid_pinpoints: list = field(default_factory=lambda: [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]])
    extra: dict = field(default_factory=dict)


def _longrope(head_dim: int, original: int) -> dict:
    n = head_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.05 * i for i in range(n)], "long_factor": [1.5 + 0.25 * i for i in range(n)]}


PRESETS: dict[str, TinySpec] = {
    "llava-hf-v1.5": TinySpec(),
    "llava-hf-gqa": TinySpec(kv_heads=2, heads=4, pad_to_square=False, seed=1),
    "original-v1": TinySpec(projector="linear", pad_to_square=False, seed=2),
    "original-v1.5": TinySpec(projector="mlp2x_gelu", pad_to_square=True, seed=3),
    # BakLLaVA-style: a Mistral decoder (GQA, sliding window) in the llava-hf layout
    "llava-mistral": TinySpec(decoder="mistral", kv_heads=2, sliding_window=160, pad_to_square=False, seed=11),
    # a Qwen2 decoder (q/k/v bias) behind a CLIP tower
    "llava-qwen2": TinySpec(decoder="qwen2", kv_heads=2, pad_to_square=False, seed=12),
    # LLaVA-Phi-3-mini-style: fused qkv / gate_up, longrope rotary scaling
    "llava-phi3": TinySpec(decoder="phi3", pad_to_square=False, max_positions=512,
                           rope_parameters=_longrope(16, 192), seed=13),
    # LLaVA-Interleave-style: Qwen2 decoder + SigLIP tower, "full" strategy, last layer
    "llava-interleave": TinySpec(decoder="qwen2", vision="siglip", kv_heads=2, select_strategy="full",
                                 vision_feature_layer=-1, pad_to_square=False, seed=14),
    # LLaVA-NeXT (1.6) anyres, Vicuna and Mistral decoders
    "next-vicuna": TinySpec(model="llava_next", pad_to_square=False, seed=15, max_positions=512),
    "next-mistral": TinySpec(model="llava_next", decoder="mistral", kv_heads=2, pad_to_square=False, seed=16,
                             max_positions=512),
}


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _vision_config(spec: TinySpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    if spec.vision == "siglip":
        return SiglipVisionConfig(vision_use_head=False, **common)
    return CLIPVisionConfig(projection_dim=spec.vision_hidden, **common)


def _text_config(spec: TinySpec, vocab_size: int, tok: Tokenizer | None):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    fam = FAMILY_TOKENS[spec.decoder]
    ids = {k: (tok.token_to_id(fam[k]) if tok is not None and fam[k] else None) for k in ("bos", "eos", "pad")}
    if tok is None:  # the "original" layout's LLaMA ids
        ids = {"bos": 1, "eos": 2, "pad": 3}
    common = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=vocab_size,
                  max_position_embeddings=spec.max_positions, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids["pad"], tie_word_embeddings=False)
    if spec.decoder == "mistral":
        return MistralConfig(sliding_window=spec.sliding_window, **common)
    if spec.decoder == "qwen2":
        return Qwen2Config(**common)
    if spec.decoder == "phi3":
        rope = dict(spec.rope_parameters) if spec.rope_parameters else None
        extra = {"original_max_position_embeddings": rope["original_max_position_embeddings"]} if rope else {}
        return Phi3Config(sliding_window=spec.sliding_window, rope_parameters=rope, **extra, **common)
    return LlamaConfig(**common)


def _configs(spec: TinySpec, vocab_size: int, image_token_id: int, tok: Tokenizer | None = None):
    from transformers import LlavaConfig, LlavaNextConfig

    vc, tc = _vision_config(spec), _text_config(spec, vocab_size, tok)
    common = dict(vision_config=vc, text_config=tc, vision_feature_layer=spec.vision_feature_layer,
                  vision_feature_select_strategy=spec.select_strategy, projector_hidden_act="gelu",
                  tie_word_embeddings=False)
    if spec.model == "llava_next":
        cfg = LlavaNextConfig(image_token_index=image_token_id, image_grid_pinpoints=spec.grid_pinpoints, **common)
    else:
        cfg = LlavaConfig(image_token_id=image_token_id, **common)
    return vc, tc, cfg


def _random_init(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are not flat: ties in argmax would make greedy
    comparisons meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layernorm" in name or "layer_norm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5) * 2)


def build_checkpoint(out_dir: str | Path, preset: str | TinySpec = "llava-hf-v1.5", layout: str | None = None):
    """Write a tiny checkpoint and return (the model it holds as LlavaForConditionalGeneration, spec).

    layout defaults to "original" for presets named original-*, else "llava-hf".
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    if layout is None:
        layout = "original" if isinstance(preset, str) and preset.startswith("original") else "llava-hf"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if layout == "original" and (spec.decoder, spec.vision, spec.model) != ("llama", "clip", "llava"):
        raise ValueError("the original LLaVA layout holds LLaMA + CLIP only; use layout='llava-hf'")
    tok = build_tokenizer(spec.vocab_size, with_image_token=(layout == "llava-hf"), family=spec.decoder)
    if layout == "llava-hf":
        vocab = tok.get_vocab_size()
        image_token_id = tok.token_to_id(IMAGE_TOKEN)
        embed_rows = vocab
    else:
        # Original LLaVA splices image features at -200 and has no <image> token; our loader appends
        # one embedding row for it. The reference model here gets the same extra row.
        vocab = tok.get_vocab_size()
        image_token_id = vocab
        embed_rows = vocab + 1
    vc, tc, cfg = _configs(spec, vocab, image_token_id, tok if layout == "llava-hf" else None)
    torch.manual_seed(spec.seed)
    model = (LlavaNextForConditionalGeneration if spec.model == "llava_next" else LlavaForConditionalGeneration)(cfg)
    if embed_rows != vocab:
        model.model.language_model.embed_tokens = torch.nn.Embedding(embed_rows, spec.hidden, padding_idx=None)
    if spec.projector == "linear":
        model.model.multi_modal_projector = torch.nn.Linear(spec.vision_hidden, spec.hidden)
    _random_init(model, spec.seed)
    if embed_rows != vocab:
        with torch.no_grad():
            model.model.language_model.embed_tokens.weight[vocab:] = 0.0
    model.eval()

    if layout == "llava-hf":
        _write_llava_hf(model, tok, spec, out)
    else:
        _write_original(model, tok, spec, out, vocab)
    return model, spec


def _image_processor(spec: TinySpec, llava_pad: bool):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if spec.vision == "siglip":  # resize to the square, mean/std 0.5, no crop (llava-interleave's processor)
        if spec.model == "llava_next":
            raise ValueError("LLaVA-NeXT with a SigLIP tower is not built here")
        return SiglipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    kwargs = dict(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    if spec.model == "llava_next":
        return LlavaNextImageProcessorPil(image_grid_pinpoints=spec.grid_pinpoints, **kwargs)
    if llava_pad:
        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    return CLIPImageProcessorPil(**kwargs)


LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The chat templates of the llava-hf checkpoints of each family (llava-v1.6-mistral-7b-hf,
# llava-interleave-qwen-*-hf, llava-phi-3-mini-hf), in the shape their hub files have.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}"
)
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llama": LLAVA_HF_CHAT_TEMPLATE, "mistral": MISTRAL_CHAT_TEMPLATE, "qwen2": CHATML_CHAT_TEMPLATE,
                  "phi3": PHI3_CHAT_TEMPLATE}


def _write_llava_hf(model, tok: Tokenizer, spec: TinySpec, out: Path) -> None:
    from transformers import LlavaNextProcessor, LlavaProcessor

    model.save_pretrained(out)
    cls = LlavaNextProcessor if spec.model == "llava_next" else LlavaProcessor
    proc = cls(
        image_processor=_image_processor(spec, spec.pad_to_square),
        tokenizer=_fast_tokenizer(tok, spec.decoder),
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        num_additional_image_tokens=0 if spec.vision == "siglip" else 1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATES[spec.decoder],
    )
    proc.save_pretrained(out)


def _write_original(model, tok: Tokenizer, spec: TinySpec, out: Path, vocab: int) -> None:
    """The LLaVA repo's layout: LlavaLlamaForCausalLM weights + a separate CLIP vision directory."""
    clip_dir = out / "clip-vision"
    clip_dir.mkdir(parents=True, exist_ok=True)
    model.config.vision_config.save_pretrained(clip_dir)
    # Hub CLIP files (openai/clip-vit-*) name the tower's weights vision_model.*; write that layout.
    tower = {f"vision_model.{k}": v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    save_file(tower, clip_dir / "model.safetensors", metadata={"format": "pt"})
    _image_processor(spec, llava_pad=False).save_pretrained(clip_dir)

    lm = model.model.language_model
    state = {f"model.{k}": v for k, v in lm.state_dict().items()}
    state["model.embed_tokens.weight"] = lm.embed_tokens.weight[:vocab]
    state["lm_head.weight"] = model.lm_head.weight
    proj = model.model.multi_modal_projector
    if spec.projector == "linear":
        state["model.mm_projector.weight"] = proj.weight
        state["model.mm_projector.bias"] = proj.bias
    else:
        state["model.mm_projector.0.weight"] = proj.linear_1.weight
        state["model.mm_projector.0.bias"] = proj.linear_1.bias
        state["model.mm_projector.2.weight"] = proj.linear_2.weight
        state["model.mm_projector.2.bias"] = proj.linear_2.bias
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})

    tc = model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "max_position_embeddings": tc.max_position_embeddings,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
        "mm_vision_tower": "./clip-vision",
        "mm_hidden_size": spec.vision_hidden,
        "mm_projector_type": spec.projector,
        "mm_vision_select_layer": spec.vision_feature_layer,
        "mm_vision_select_feature": "patch" if spec.select_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad" if spec.pad_to_square else "square",
        "tokenizer_model_max_length": tc.max_position_embeddings,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_hf_tokenizer(tok, out)

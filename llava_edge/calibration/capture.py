"""Turn calibration conversations into the decoder-layer inputs GPTQ needs.

We run the *full* torch LLaVA forward (vision tower, projector, image-feature merge, rotary
embeddings, causal mask) and stop it at the first decoder layer with a pre-hook: what that hook
sees is exactly what the layer sees at inference, image tokens included. Everything after that
(layer by layer, in :mod:`.sequential`) replays those captured inputs, so the rest of the model
never needs to run again.

Prompts follow LLaVA-1.5's format, ``"USER: <image>\\n{question} ASSISTANT: {answer}</s>"`` per turn
(the image only in the first), with ``<image>`` expanded to ``num_image_tokens`` image-token ids as
transformers' processor does. Images are preprocessed in numpy from the package's
:class:`~llava_edge.package.VisionConfig` (same steps as the CLIP image processor), so calibration
sees the pixels the runtime will feed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data import Conversation
from .progress import progress_iter

IMAGE_MARKER = "<image>"
EOS_MARKER = "</s>"


@dataclass
class PromptFormat:
    image_token_id: int
    num_image_tokens: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    max_seq_len: int = 2048


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # [1, T] int64
    pixel_values: torch.Tensor | None  # [1, 3, S, S] float32, or None for text-only samples


@dataclass
class LayerInput:
    """What one decoder-layer call received for one sample (hidden states in float32, CPU)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Plain-text encoder (no special tokens) from a `tokenizers.Tokenizer` or a transformers one."""

    def encode(text: str) -> list[int]:
        out = tokenizer.encode(text, add_special_tokens=False)
        return list(out.ids) if hasattr(out, "ids") else list(out)

    return encode


def conversation_text(conv: Conversation, with_image: bool) -> str:
    parts = []
    for i, (q, a) in enumerate(conv.turns):
        prefix = f"{IMAGE_MARKER}\n" if (i == 0 and with_image) else ""
        parts.append(f"USER: {prefix}{q} ASSISTANT:" + (f" {a}{EOS_MARKER}" if a else ""))
    return "".join(parts)


def encode_conversation(conv: Conversation, encode: Callable[[str], list[int]], fmt: PromptFormat) -> list[int]:
    """Token ids of a conversation: text pieces are tokenized separately and the markers are
    replaced by ids, so the result does not depend on how a tokenizer handles ``<image>``."""
    text = conversation_text(conv, conv.image is not None)
    ids: list[int] = [] if fmt.bos_token_id is None else [fmt.bos_token_id]
    for piece in re.split(f"({re.escape(IMAGE_MARKER)}|{re.escape(EOS_MARKER)})", text):
        if piece == IMAGE_MARKER:
            ids.extend([fmt.image_token_id] * fmt.num_image_tokens)
        elif piece == EOS_MARKER:
            if fmt.eos_token_id is not None:
                ids.append(fmt.eos_token_id)
        elif piece:
            ids.extend(encode(piece))
    if len(ids) > fmt.max_seq_len:
        last_image = max((i for i, t in enumerate(ids) if t == fmt.image_token_id), default=-1)
        if last_image >= fmt.max_seq_len:
            raise ValueError(f"max_seq_len={fmt.max_seq_len} cannot hold the {fmt.num_image_tokens} image tokens")
        ids = ids[: fmt.max_seq_len]
    return ids


def preprocess_image(image: Image.Image, vision: Any) -> np.ndarray:
    """CLIP preprocessing in numpy -> float32 [3, S, S]: optional pad-to-square with the mean
    colour (LLaVA-1.5), resize of the shortest edge, centre crop, rescale, normalize."""
    image = image.convert("RGB")
    if vision.pad_to_square and image.width != image.height:
        side = max(image.size)
        bg = tuple(int(round(m * 255)) for m in vision.image_mean)
        canvas = Image.new("RGB", (side, side), bg)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    short = vision.shortest_edge
    w, h = image.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    image = image.resize(size, resample=vision.resample)
    s = vision.image_size
    if vision.do_center_crop or image.size != (s, s):
        left = (image.width - s) // 2
        top = (image.height - s) // 2
        image = image.crop((left, top, left + s, top + s))
    x = np.asarray(image, dtype=np.float32) * vision.rescale_factor
    x = (x - np.asarray(vision.image_mean, np.float32)) / np.asarray(vision.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def encode_samples(
    convs: Sequence[Conversation],
    encode: Callable[[str], list[int]],
    fmt: PromptFormat,
    vision: Any | None,
    image_preprocess: Callable[[Image.Image, Any], np.ndarray] = preprocess_image,
) -> list[EncodedSample]:
    out = []
    for conv in convs:
        if conv.image is not None and vision is None:
            raise ValueError("image calibration samples need the package's vision config")
        ids = encode_conversation(conv, encode, fmt)
        pix = None
        if conv.image is not None:
            pix = torch.from_numpy(image_preprocess(conv.image, vision)).unsqueeze(0)
        out.append(EncodedSample(torch.tensor([ids], dtype=torch.long), pix))
    return out


@dataclass
class DecoderHandles:
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear | None
    prefix: str  # torch module path of the layer list, e.g. "model.language_model.layers"


def find_decoder(model: nn.Module) -> DecoderHandles:
    """The decoder-layer list of a LlavaForConditionalGeneration or a plain *ForCausalLM."""
    for path in ("model.language_model", "language_model.model", "model"):
        mod: Any = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(getattr(mod, "layers", None), nn.ModuleList) and hasattr(mod, "norm"):
            lm_head = getattr(model, "lm_head", None) or getattr(getattr(model, "language_model", None), "lm_head", None)
            return DecoderHandles(mod.layers, mod.norm, lm_head, f"{path}.layers")
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    return obj


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, samples: Sequence[EncodedSample], device: torch.device | str = "cpu", progress: bool = True
) -> list[LayerInput]:
    """Run the model's forward on each sample (batch 1: samples differ in length, so no padding
    and no padding mask to get wrong) and record the first decoder layer's inputs."""
    handles = find_decoder(model)
    captured: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw["use_cache"] = False
        captured.append(LayerInput(hidden.detach().to("cpu", torch.float32), _to(kw, "cpu", torch.float32)))
        raise _StopForward

    vision_dtype = next(model.parameters()).dtype
    handle = handles.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in progress_iter(samples, "capturing layer-0 inputs", enabled=progress):
            inputs: dict[str, Any] = {"input_ids": s.input_ids.to(device), "use_cache": False}
            if s.pixel_values is not None:
                inputs["pixel_values"] = s.pixel_values.to(device, vision_dtype)
            try:
                model(**inputs)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the forward pass never reached the first decoder layer")
    finally:
        handle.remove()
    return captured

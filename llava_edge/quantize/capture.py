"""Turn calibration conversations into the decoder-layer inputs GPTQ needs.

We run the *full* torch LLaVA forward (vision tower, projector, image-feature merge, rotary
embeddings, causal mask) and stop it at the first decoder layer with a pre-hook: what that hook
sees is exactly what the layer sees at inference, image tokens included. Everything after that
(layer by layer, in :mod:`.sequential`) replays those captured inputs, so the rest of the model
never needs to run again.

Prompts and pixels are built with the runtime's own code (``llava_edge.runtime.prompt`` and
``.preprocess``, the package's chat template, e.g. ``"USER: <image>\\n{question} ASSISTANT: {answer}</s>"``
with ``<image>`` expanded to ``num_image_tokens`` ids), so calibration sees exactly the token ids and
pixels the runtime will feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..runtime import anyres
from ..runtime import prompt as prompts
from ..runtime.preprocess import preprocess
from .data import Conversation
from ..progress import progress_iter

@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # [1, T] int64, image tokens already expanded
    pixel_values: torch.Tensor | None  # [1, 3, S, S] float32 ([1, tiles, 3, S, S] anyres), None: text only
    image_sizes: torch.Tensor | None = None  # [1, 2] (height, width), LLaVA-NeXT anyres only


@dataclass
class LayerInput:
    """What one decoder-layer call received for one sample (hidden states in float32, CPU)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def encode_conversation(conv: Conversation, tokenizer: Any, text: Any, num_image_tokens: int,
                        template: str | None = None, max_seq_len: int | None = None) -> np.ndarray:
    """Token ids exactly as the runtime builds them (same template renderer, tokenizer and image
    token expansion), with the answers filled in; truncated at ``max_seq_len`` but never inside the
    image tokens."""
    turns = [(q, a or None) for q, a in conv.turns]  # an empty answer ends the turn at "ASSISTANT:"
    rendered = prompts.render(template or text.chat_template, turns, text.image_token, int(conv.image is not None))
    ids = tokenizer.encode(rendered).ids
    ids, n_images = prompts.expand_image_tokens(ids, text.image_token_id, num_image_tokens)
    if n_images != int(conv.image is not None):
        raise ValueError(f"{conv.source}: the rendered prompt has {n_images} image tokens (tokenizer lacks "
                         f"{text.image_token!r} as a single token?)")
    limit = max_seq_len or text.max_context
    if len(ids) > limit:
        where = np.flatnonzero(ids == text.image_token_id)
        if where.size and where[-1] >= limit:
            raise UsageError(f"max_seq_len={limit} cannot hold the {num_image_tokens} image tokens")
        ids = ids[:limit]
    return ids


def encode_samples(convs: Sequence[Conversation], tokenizer: Any, text: Any, vision: Any,
                   template: str | None = None, max_seq_len: int | None = None) -> list[EncodedSample]:
    """Conversations -> model inputs; ``text``/``vision`` are the package's TextConfig/VisionConfig."""
    out = []
    for conv in convs:
        n_tokens, pix, sizes = vision.num_image_tokens, None, None
        if conv.image is not None and vision.anyres:  # LLaVA-NeXT: tiles, and a count that depends on the size
            tiles, size = anyres.image_tiles(conv.image, vision)
            n_tokens, pix, sizes = (anyres.num_image_tokens(size, vision), torch.from_numpy(tiles)[None],
                                    torch.tensor([size]))
        elif conv.image is not None:
            pix = torch.from_numpy(preprocess(conv.image, vision)).unsqueeze(0)
        ids = encode_conversation(conv, tokenizer, text, n_tokens, template, max_seq_len)
        out.append(EncodedSample(torch.from_numpy(ids).unsqueeze(0), pix, sizes))
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
            lm_head = (getattr(model, "lm_head", None)
                       or getattr(getattr(model, "language_model", None), "lm_head", None))
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
            if s.image_sizes is not None:
                inputs["image_sizes"] = s.image_sizes.to(device)
            try:
                model(**inputs)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the forward pass never reached the first decoder layer")
    finally:
        handle.remove()
    return captured

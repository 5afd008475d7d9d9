"""Chat templates and image-token expansion.

Templates are named and written out here (not Jinja) so that the runtime renders the exact string the
checkpoint was trained on without a template engine, and a test can pin each one. The manifest names
the template; `--template` overrides it. At export, a checkpoint's own Jinja `chat_template` is mapped to
one of these by its markers (`detect_template`: vicuna USER/ASSISTANT, Mistral [INST], ChatML for Qwen2,
Phi-3 <|user|>) and accepted only if transformers' rendering of it equals ours on probe conversations
(export/checkpoint.py `resolve_chat_template`); the runtime never evaluates Jinja.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UsageError

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Template:
    system: str
    user: str  # prefix of a user turn
    assistant: str  # prefix of an assistant turn (what generation starts after)
    sep: str  # after a user message
    end: str  # after an assistant message
    answer_sep: str = " "  # between the assistant prefix and the answer


TEMPLATES: dict[str, Template] = {
    # llava-hf LLaVA-1.5: "USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
    "llava_hf": Template(system="", user="USER: ", assistant="ASSISTANT:", sep=" ", end="</s>"),
    # the llava-hf hub template of llava-1.5-*-hf: answers end with a space, not </s>
    "llava_hf_space": Template(system="", user="USER: ", assistant="ASSISTANT:", sep=" ", end=" "),
    # original LLaVA conv_vicuna_v1 / conv_llava_v1: system prompt, same roles and separators.
    "llava_v1": Template(system=VICUNA_SYSTEM + " ", user="USER: ", assistant="ASSISTANT:", sep=" ", end="</s>"),
    # no chat wrapping: the prompt is used as written (after the image token)
    "plain": Template(system="", user="", assistant="", sep="", end="</s>", answer_sep=""),
    # Mistral instruct (llava-v1.6-mistral, BakLLaVA): "[INST] <image>\n{q} [/INST]{a}</s>[INST] ..."
    "mistral_inst": Template(system="", user="[INST] ", assistant="", sep=" [/INST]", end="</s>", answer_sep=""),
    # ChatML (Qwen2, llava-interleave): "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    "chatml": Template(system="", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n",
                       sep="<|im_end|>\n", end="<|im_end|>\n", answer_sep=""),
    # Phi-3: "<|user|>\n<image>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n"
    "phi3": Template(system="", user="<|user|>\n", assistant="<|assistant|>\n", sep="<|end|>\n", end="<|end|>\n",
                     answer_sep=""),
}

# The renderer a decoder family gets when its checkpoint has no (recognised) chat template.
DEFAULT_TEMPLATE = {"llama": "llava_hf", "mistral": "mistral_inst", "qwen2": "chatml", "phi3": "phi3"}

# Conversations a recognised checkpoint template must render exactly as we do (export-time check).
PROBE_CONVERSATIONS: list[list[tuple[str, str | None]]] = [
    [("What is in the picture?", None)],
    [("Describe it.", "A red circle on the left."), ("And the colour of the sky?", None)],
]


def template_candidates(jinja: str) -> list[str]:
    """Which of our renderers a Jinja chat template may be written for, by its markers (empty if none).
    Guesses only: the caller keeps the first that renders identically (see the module docstring)."""
    if "[INST]" in jinja:
        return ["mistral_inst"]
    if "<|im_start|>" in jinja:
        return ["chatml"]
    if "<|user|>" in jinja or ("<|end|>" in jinja and "'<|' + message['role']" in jinja):
        return ["phi3"]
    if "ASSISTANT" in jinja and ("USER" in jinja or "role'].upper()" in jinja):  # hub: role.upper() + ': '
        return ["llava_v1"] if "A chat between" in jinja else ["llava_hf", "llava_hf_space"]
    return []


def to_messages(turns: list[tuple[str, str | None]], num_images: int = 1) -> list[dict]:
    """Our (question, answer) turns as transformers chat messages, images first in the first user turn."""
    messages = []
    for i, (user, answer) in enumerate(turns):
        content = [{"type": "image"}] * (num_images if i == 0 else 0) + [{"type": "text", "text": user}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render(template: str, turns: list[tuple[str, str | None]], image_token: str, num_images: int = 1) -> str:
    """turns: [(user, assistant or None for the turn to generate), ...]. Images go at the start of the
    first user message unless the caller already placed image tokens in the text."""
    if template not in TEMPLATES:
        raise UsageError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    placed = sum(u.count(image_token) for u, _ in turns)
    parts = [t.system]
    for i, (user, answer) in enumerate(turns):
        if i == 0 and placed == 0 and num_images:
            user = (image_token + "\n") * num_images + user
        parts.append(t.user + user + t.sep + t.assistant)
        if answer is not None:
            parts.append(t.answer_sep + answer + t.end)
    return "".join(parts)


def expand_image_tokens(ids: list[int], image_token_id: int,
                        tokens_per_image: int | Sequence[int]) -> tuple[np.ndarray, int]:
    """Replace each image token by its features' slots: tokens_per_image copies, or, for images whose
    count varies (LLaVA-NeXT anyres), tokens_per_image[k] copies for the k-th; return ids and count."""
    out: list[int] = []
    n = 0
    for i in ids:
        if i == image_token_id:
            k = tokens_per_image if isinstance(tokens_per_image, int) else (
                tokens_per_image[n] if n < len(tokens_per_image) else 0)
            out.extend([image_token_id] * k)
            n += 1
        else:
            out.append(i)
    return np.asarray(out, dtype=np.int64), n

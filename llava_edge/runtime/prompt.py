"""Chat templates and image-token expansion.

Templates are named and written out here (not Jinja) so that the runtime renders the exact string the
checkpoint was trained on without a template engine, and a test can pin each one. The manifest names
the template; `--template` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

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


TEMPLATES: dict[str, Template] = {
    # llava-hf LLaVA-1.5: "USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
    "llava_hf": Template(system="", user="USER: ", assistant="ASSISTANT:", sep=" ", end="</s>"),
    # original LLaVA conv_vicuna_v1 / conv_llava_v1: system prompt, same roles and separators.
    "llava_v1": Template(system=VICUNA_SYSTEM + " ", user="USER: ", assistant="ASSISTANT:", sep=" ", end="</s>"),
    # no chat wrapping: the prompt is used as written (after the image token)
    "plain": Template(system="", user="", assistant="", sep="", end="</s>"),
}


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
            parts.append(" " + answer + t.end if t.assistant else answer + t.end)
    return "".join(parts)


def expand_image_tokens(ids: list[int], image_token_id: int, tokens_per_image: int) -> tuple[np.ndarray, int]:
    """Replace each image token by tokens_per_image copies (the features' slots); return ids and count."""
    out: list[int] = []
    n = 0
    for i in ids:
        if i == image_token_id:
            out.extend([image_token_id] * tokens_per_image)
            n += 1
        else:
            out.append(i)
    return np.asarray(out, dtype=np.int64), n

"""The reference a pruned prompt is held to: the engine's kept embeddings written out by hand, each kept token at
the index it has in the UNPRUNED prompt (derived from that prompt's layout, not from runtime/prune.prompt_positions),
and transformers' greedy answer for them at those positions."""

from __future__ import annotations

import numpy as np
import torch

from llava_edge.runtime import anyres
from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.preprocess import preprocess
from llava_edge.runtime.prune import PruneSetting


def kept_prompt(pipe: Pipeline, images, question: str, setting: PruneSetting) -> tuple[np.ndarray, np.ndarray]:
    """Kept embeddings [T, H] of the pruned prompt, and each token's index in the unpruned prompt."""
    m = pipe.manifest
    image_id, v = m.text.image_token_id, m.vision
    ids = pipe.encode_request(Request([(question, None)], images), setting)
    full = pipe.encode_request(Request([(question, None)], images), PruneSetting())
    embeds = pipe.backend.embed(ids[None])[0]
    instruction = embeds[int(np.flatnonzero(ids == image_id)[-1]) + 1 :] if setting.needs_instruction else None
    if v.anyres:
        feats = anyres.encode(list(images), v, pipe.backend.encode_images)
    else:
        feats = list(pipe.backend.encode_images(np.stack([preprocess(im, v) for im in images])))
    image_slots = np.flatnonzero(full == image_id)  # every image's tokens in the unpruned prompt, in order
    rows, at = [], [np.flatnonzero(full != image_id)]
    for f in feats:
        f = f.reshape(-1, embeds.shape[-1])
        keep = setting.select(f, instruction) if setting.active else np.arange(len(f))
        rows.append(f[keep])
        at.append(image_slots[keep])
        image_slots = image_slots[len(f) :]
    embeds[ids == image_id] = np.concatenate(rows)
    positions = np.sort(np.concatenate(at))  # kept order = prompt order: text and kept tokens where they were
    assert len(positions) == len(ids)
    return embeds, positions


def hf_greedy(model, embeds: np.ndarray, positions: np.ndarray, tokens: int,
              eos: frozenset[int] = frozenset()) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy answer for these embeddings at these positions (no cache: a full forward per token)
    and its logits at each step; decoding continues from the last position + 1 and stops after an eos."""
    x, pos = torch.from_numpy(embeds)[None], torch.from_numpy(np.asarray(positions, np.int64))[None]
    table = model.get_input_embeddings()
    out, logits = [], []
    with torch.no_grad():
        for _ in range(tokens):
            row = model(inputs_embeds=x, position_ids=pos).logits[0, -1].float().numpy()
            logits.append(row)
            out.append(int(row.argmax()))
            if out[-1] in eos:
                break
            x = torch.cat([x, table(torch.tensor([[out[-1]]]))], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return out, logits

"""Pruning on every decoder family we export and on LLaVA-NeXT tiles: the fast decoder through the engine and
the portable decoder in a static batch read the same pruned prompt (kept rows at their original positions) and
answer alike; ratio 0 answers as today; a NeXT image is pruned across all its tiles by its own token count (its
positions across all of them too)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_edge.runtime import anyres
from llava_edge.runtime.pipeline import Pipeline
from llava_edge.runtime.prune import PruneSetting

from .conftest import FAMILIES

NEXT = ["next-vicuna", "next-mistral"]
QUESTIONS = ["What is in the picture?", "Where is the small red circle, on the left or on the right?"]
TOKENS = 12


@pytest.fixture(scope="module")
def two_shapes(images):
    return [images["portrait"], Image.fromarray(np.random.default_rng(3).integers(0, 255, (57, 80, 3), np.uint8))]


def _counts(pipe: Pipeline, pics, setting: PruneSetting) -> list[int]:
    v = pipe.manifest.vision
    full = [anyres.num_image_tokens(im.size[::-1], v) if v.anyres else v.num_image_tokens for im in pics]
    return [setting.kept_count(n) for n in full]


@pytest.mark.parametrize("preset", FAMILIES + NEXT)
@pytest.mark.parametrize("setting", ["dart:0.5", "cdpruner:0.75"])
def test_fast_engine_and_portable_batch_agree_when_pruned(family_models, two_shapes, preset, setting):
    pkg = family_models[preset]["package"]
    s = PruneSetting.parse(setting)
    fast = Pipeline.from_package(pkg, backend="ort-fast", threads=1, prefix_cache=0, prune=s)
    portable = Pipeline.from_package(pkg, backend="ort", threads=1, prefix_cache=0, prune=s)
    off = Pipeline.from_package(pkg, backend="ort-fast", threads=1, prefix_cache=0)
    alone = [fast.generate(im, q, TOKENS) for im, q in zip(two_shapes, QUESTIONS)]
    batch = portable.generate_batch(two_shapes, QUESTIONS, TOKENS)  # left-padded, each row's own positions
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    full = [off.generate(im, q, TOKENS) for im, q in zip(two_shapes, QUESTIONS)]
    kept, every = _counts(fast, two_shapes, s), _counts(fast, two_shapes, PruneSetting())
    assert [f.prompt_tokens - a.prompt_tokens for f, a in zip(full, alone)] == [e - k for e, k in zip(every, kept)]
    if anyres := fast.manifest.vision.anyres:  # NeXT: the two shapes take different counts, pruned each by its own
        assert every[0] != every[1] and kept[0] != kept[1]
    assert anyres or every[0] == every[1]


@pytest.mark.parametrize("preset", FAMILIES + NEXT)
def test_ratio_zero_is_today(family_models, two_shapes, preset):
    pkg = family_models[preset]["package"]
    base = Pipeline.from_package(pkg, backend="ort-fast", threads=1)
    zero = Pipeline.from_package(pkg, backend="ort-fast", threads=1, prune="cdpruner:0")
    for im, q in zip(two_shapes, QUESTIONS):
        assert zero.generate(im, q, TOKENS).token_ids == base.generate(im, q, TOKENS).token_ids


@pytest.mark.parametrize("preset", ["llava-phi3", "next-vicuna"])
def test_original_positions_match_transformers(family_models, two_shapes, preset):
    """Each kept token at its index in the unpruned prompt (NeXT: across overview, grid tiles and newlines),
    the text after the image where it was: transformers' greedy answer at those positions."""
    from prune_reference import hf_greedy, kept_prompt

    m = family_models[preset]
    s = PruneSetting.parse("dart:0.5")
    fast = Pipeline.from_package(m["package"], backend="ort-fast", threads=1, prefix_cache=0, prune=s)
    im, q = two_shapes[1], QUESTIONS[0]
    embeds, positions = kept_prompt(fast, [im], q, s)
    assert positions[-1] + 1 > len(positions)
    want, _ = hf_greedy(m["model"], embeds, positions, TOKENS, frozenset(fast.manifest.text.eos_token_ids))
    assert fast.generate(im, q, TOKENS).token_ids == want

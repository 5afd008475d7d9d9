"""Prefix reuse: same answers as a cold run, vision skipped, history reused, other images not confused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def fast_package(gqa_fast_package):
    return gqa_fast_package


@pytest.mark.parametrize("backend", ["ort", "ort-fast"])
def test_second_question_reuses_the_image_prefix(fast_package, images, backend):
    warm = Pipeline.from_package(fast_package, backend=backend)
    cold = Pipeline.from_package(fast_package, backend=backend, prefix_cache=0)
    img = images["landscape"]
    first = warm.generate(img, "What is in the picture?", max_new_tokens=12)
    second = warm.generate(img, "How many shapes are there?", max_new_tokens=12)
    assert warm.prefix_cache.hits == 1
    assert warm.prefix_cache.reused_tokens > warm.manifest.vision.num_image_tokens  # system + image covered
    assert second.timings.vision_ms == 0.0 and first.timings.vision_ms > 0
    reference = cold.generate(img, "How many shapes are there?", max_new_tokens=12)
    assert second.token_ids == reference.token_ids


@pytest.mark.parametrize("backend", ["ort", "ort-fast"])
def test_chat_history_is_reused_and_answers_unchanged(fast_package, images, backend):
    warm = Pipeline.from_package(fast_package, backend=backend)
    cold = Pipeline.from_package(fast_package, backend=backend, prefix_cache=0)
    img = images["portrait"]
    a1 = warm.generate(img, "Describe it.", max_new_tokens=8)
    a2 = warm.generate(img, "And the colour?", max_new_tokens=8, history=[("Describe it.", a1.text)])
    assert warm.prefix_cache.hits == 1
    ref = cold.generate(img, "And the colour?", max_new_tokens=8, history=[("Describe it.", a1.text)])
    assert a2.token_ids == ref.token_ids


def test_a_different_image_is_not_reused(fast_package, images):
    pipe = Pipeline.from_package(fast_package)
    pipe.generate(images["landscape"], "What is in the picture?", max_new_tokens=4)
    other = Image.fromarray(np.asarray(images["landscape"])[::-1].copy())  # same size, other pixels
    res = pipe.generate(other, "What is in the picture?", max_new_tokens=4)
    assert pipe.prefix_cache.hits == 0 and res.timings.vision_ms > 0

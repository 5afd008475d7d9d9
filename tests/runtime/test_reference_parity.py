"""The runtime against transformers: same greedy tokens, same logits, same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_edge.export.verify import hf_greedy_tokens
from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.preprocess import preprocess

PRESETS = ["llava-hf-v1.5", "llava-hf-gqa", "original-v1"]  # built by conftest.tiny_models

NEW_TOKENS = 32


def _hf_generate(model, pipe: Pipeline, images, questions, max_new_tokens=NEW_TOKENS):
    enc = [pipe.encode_request(Request([(q, None)], [im])) for q, im in zip(questions, images)]
    return hf_greedy_tokens(model, pipe, images, questions, max_new_tokens), enc


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_tokens_match_transformers(tiny_models, images, preset):
    m = tiny_models[preset]
    pipe = Pipeline.from_package(m["package"])
    ours = pipe.generate(images["landscape"], "What is in the picture?", max_new_tokens=NEW_TOKENS)
    ref, _ = _hf_generate(m["model"], pipe, [images["landscape"]], ["What is in the picture?"])
    assert ours.token_ids == ref[0]
    assert len(ours.token_ids) == NEW_TOKENS  # random weights: no early eos, so all 32 were compared


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_of_two_lengths_matches_transformers(tiny_models, images, preset):
    m = tiny_models[preset]
    pipe = Pipeline.from_package(m["package"])
    imgs = [images["portrait"], images["rgba"]]
    questions = ["Describe it.", "Where is the small red circle, on the left or on the right of the image?"]
    ours = pipe.generate_batch(imgs, questions, max_new_tokens=NEW_TOKENS)
    ref, enc = _hf_generate(m["model"], pipe, imgs, questions)
    assert len(enc[0]) != len(enc[1])  # the batch really is ragged
    assert [r.token_ids for r in ours] == ref
    # batching changes nothing: each row equals its own single run
    singles = [pipe.generate(im, q, max_new_tokens=NEW_TOKENS) for im, q in zip(imgs, questions)]
    assert [s.token_ids for s in singles] == [r.token_ids for r in ours]


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_logits_within_1e4(tiny_models, images, preset):
    """Prefill and two decode steps through the runtime's backend vs transformers' forward."""
    m = tiny_models[preset]
    pipe = Pipeline.from_package(m["package"])
    ids = pipe.encode_request(Request([("What colour is it?", None)], [images["grayscale"]]))
    pixels = preprocess(images["grayscale"], pipe.manifest.vision)[None]
    backend = pipe.backend
    feats = backend.encode_images(pixels)
    embeds = backend.embed(ids[None])
    embeds[0, ids == pipe.manifest.text.image_token_id] = feats[0]
    cache = backend.new_cache(1, len(ids) + 2)
    mask = np.ones((1, len(ids)), np.int64)
    ours = [backend.step(cache, embeds, mask, np.arange(len(ids))[None])]
    extra = [7, 11]
    for j, tok in enumerate(extra):
        mask = np.ones((1, len(ids) + j + 1), np.int64)
        ours.append(backend.step(cache, backend.embed(np.array([[tok]])), mask, np.array([[len(ids) + j]])))
    full = torch.from_numpy(np.concatenate([ids, extra]))[None]
    with torch.no_grad():
        ref = m["model"](input_ids=full, pixel_values=torch.from_numpy(pixels)).logits[0]
    for j, logits in enumerate(ours):
        np.testing.assert_allclose(logits[0], ref[len(ids) - 1 + j].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("processor", ["clip", "llava-pad"])
def test_preprocessing_matches_transformers(images, processor):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava import LlavaImageProcessorPil

    from llava_edge.export.factory import CLIP_MEAN, CLIP_STD
    from llava_edge.package import VisionConfig

    kw = dict(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, image_mean=CLIP_MEAN,
              image_std=CLIP_STD)
    hf = LlavaImageProcessorPil(do_pad=True, **kw) if processor == "llava-pad" else CLIPImageProcessorPil(**kw)
    cfg = VisionConfig(image_size=48, patch_size=8, shortest_edge=48, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                       rescale_factor=1 / 255, resample=3, do_center_crop=True,
                       pad_to_square=processor == "llava-pad", num_image_tokens=36, vision_feature_layer=-2,
                       select_strategy="default")
    for name, im in images.items():
        want = hf(images=im, return_tensors="np")["pixel_values"][0]
        got = preprocess(im, cfg)
        assert got.shape == want.shape == (3, 48, 48), name
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)

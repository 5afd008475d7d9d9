"""LLaVA-NeXT anyres: tiles and grid choice equal LlavaNextImageProcessor's, packing equals
pack_image_features, and three aspect ratios in one left-padded batch give transformers' greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava_edge.runtime import anyres
from llava_edge.runtime.pipeline import Pipeline, Request

from .test_decoders import NEW_TOKENS, _hf_greedy, _processor

NEXT = ["next-vicuna", "next-mistral"]
QUESTIONS = ["What is in the picture?", "Describe it.", "Where is the small red circle, on the left or on the right?"]
PINPOINTS_48 = [[48, 96], [96, 48], [96, 96], [144, 48], [48, 144]]  # llava-v1.6's grid, scaled to 48 px tiles


def _cfg(size: int, pinpoints, newline_dim: int = 8):
    from llava_edge.export.factory import CLIP_MEAN, CLIP_STD
    from llava_edge.package import VisionConfig

    return VisionConfig(image_size=size, patch_size=8, shortest_edge=size, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                        rescale_factor=1 / 255, resample=3, do_center_crop=True, pad_to_square=False,
                        num_image_tokens=(size // 8) ** 2, vision_feature_layer=-2, select_strategy="default",
                        anyres={"grid_pinpoints": pinpoints,
                                "image_newline": np.linspace(-1, 1, newline_dim).tolist()})


@pytest.fixture(scope="module")
def three_shapes(images):
    rng = np.random.default_rng(3)
    square = Image.fromarray(rng.integers(0, 255, (57, 57, 3), dtype=np.uint8))
    return [images["portrait"], images["landscape"], square]


@pytest.mark.parametrize("size,pinpoints", [(32, None), (48, PINPOINTS_48)])
def test_tiles_match_llava_next_processor(images, three_shapes, size, pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from llava_edge.export.factory import CLIP_MEAN, CLIP_STD, TinySpec

    pinpoints = pinpoints or TinySpec().grid_pinpoints
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD, image_grid_pinpoints=pinpoints)
    cfg = _cfg(size, pinpoints)
    extra = {"odd-large": Image.fromarray(np.random.default_rng(4).integers(0, 255, (131, 77, 3), dtype=np.uint8))}
    for name, im in {**images, **extra, "square": three_shapes[2]}.items():
        want = hf(images=im, return_tensors="np")
        got, got_size = anyres.image_tiles(im, cfg)
        assert tuple(want["image_sizes"][0]) == got_size, name
        assert got.shape == want["pixel_values"][0].shape, name  # one image: no padding of the tile batch
        np.testing.assert_allclose(got, want["pixel_values"][0], atol=1e-5, rtol=0, err_msg=name)


def test_grid_choice_and_token_count_match_transformers():
    from transformers import LlavaNextProcessor
    from transformers.image_processing_utils import select_best_resolution

    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only the counting methods are used
    proc.patch_size, proc.num_additional_image_tokens = 8, 1

    class _IP:
        image_grid_pinpoints = PINPOINTS_48

    proc.image_processor = _IP()
    cfg = _cfg(48, PINPOINTS_48)
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (3, 5), (48, 96), (97, 41), (33, 120), (500, 499), *rng.integers(1, 900, (200, 2)).tolist()]:
        assert anyres.select_best_resolution((h, w), PINPOINTS_48) == select_best_resolution((h, w), PINPOINTS_48)
        assert anyres.num_image_tokens((h, w), cfg) == proc._get_number_of_features(h, w, 48, 48) - 1, (h, w)


def test_pack_matches_transformers_pack_image_features():
    from transformers import LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    cfg = _cfg(48, PINPOINTS_48, newline_dim=8)
    model = LlavaNextModel.__new__(LlavaNextModel)  # pack_image_features reads only the config
    torch.nn.Module.__init__(model)
    model.config = LlavaNextConfig(vision_config={"model_type": "clip_vision_model", "image_size": 48, "patch_size": 8},
                                   text_config={"model_type": "llama"}, image_grid_pinpoints=PINPOINTS_48)
    newline = torch.tensor(cfg.anyres["image_newline"], dtype=torch.float32)
    rng = np.random.default_rng(1)
    for size in [(97, 41), (33, 120), (57, 57), (3, 5), (200, 90)]:
        gh, gw = [x // 48 for x in anyres.select_best_resolution(size, PINPOINTS_48)]
        feats = rng.standard_normal((1 + gh * gw, 36, 8)).astype(np.float32)
        want, lens = model.pack_image_features([torch.from_numpy(feats)], torch.tensor([size]), "default", newline)
        got = anyres.pack_image_features(feats, size, cfg)
        assert got.shape[0] == anyres.num_image_tokens(size, cfg) == int(lens[0])
        np.testing.assert_array_equal(got, want[0].numpy())


@pytest.fixture(scope="module")
def next_references(family_models, three_shapes):
    out = {}

    def get(preset):
        if preset not in out:
            m = family_models[preset]
            out[preset] = _hf_greedy(m["model"], _processor(m["checkpoint"]), three_shapes, QUESTIONS)
        return out[preset]

    return get


@pytest.mark.parametrize("preset", NEXT)
def test_prompt_ids_equal_the_checkpoint_processor(family_models, next_references, three_shapes, preset):
    pipe = Pipeline.from_package(family_models[preset]["package"])
    want, _ = next_references(preset)
    got = [pipe.encode_request(Request([(q, None)], [im])).tolist() for q, im in zip(QUESTIONS, three_shapes)]
    assert got == want
    counts = [sum(t == pipe.manifest.text.image_token_id for t in ids) for ids in got]
    assert len(set(counts)) == 3  # three aspect ratios, three different numbers of image tokens


@pytest.mark.parametrize("backend", ["ort", "ort-fast"])
@pytest.mark.parametrize("preset", NEXT)
def test_three_aspect_ratios_batch_matches_transformers(family_models, next_references, three_shapes, preset,
                                                         backend):
    pipe = Pipeline.from_package(family_models[preset]["package"], backend=backend)
    prompts_, ref = next_references(preset)
    assert len({len(p) for p in prompts_}) == 3  # left-padded to the longest
    ours = pipe.generate_batch(three_shapes, QUESTIONS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in ours] == ref
    assert sum(len(r) for r in ref) >= 2 * NEW_TOKENS, [len(r) for r in ref]  # enough tokens compared
    # batching changes nothing: a row alone gives the same tokens
    assert pipe.generate(three_shapes[0], QUESTIONS[0], max_new_tokens=NEW_TOKENS).token_ids == ref[0]


@pytest.mark.parametrize("preset", NEXT)
def test_next_logits_within_1e4(family_models, three_shapes, preset):
    """Prefill logits through the runtime (tiles -> vision -> pack -> decoder) vs transformers' forward."""
    m = family_models[preset]
    pipe = Pipeline.from_package(m["package"])
    im = three_shapes[1]
    ids = pipe.encode_request(Request([("What colour is it?", None)], [im]))
    embeds = pipe.backend.embed(ids[None])
    embeds[0, ids == pipe.manifest.text.image_token_id] = pipe._image_features([im])
    cache = pipe.backend.new_cache(1, len(ids))
    ours = pipe.backend.step(cache, embeds, np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None])
    tiles, size = anyres.image_tiles(im, pipe.manifest.vision)
    with torch.no_grad():
        ref = m["model"](input_ids=torch.from_numpy(ids)[None], pixel_values=torch.from_numpy(tiles)[None],
                         image_sizes=torch.tensor([size])).logits[0, -1]
    np.testing.assert_allclose(ours[0], ref.numpy(), atol=1e-4, rtol=0)


def test_next_manifest(family_models):
    from llava_edge.package import load_manifest

    m = load_manifest(family_models["next-mistral"]["package"])
    assert m.family == {"model": "llava_next", "decoder": "mistral", "vision": "clip"}
    assert m.vision.anyres["grid_pinpoints"] == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert len(m.vision.anyres["image_newline"]) == m.text.hidden_size
    assert m.text.chat_template == "mistral_inst"


def test_cli_run_greedy_and_prefix_cache(family_models, next_references, three_shapes, tmp_path):
    """`llava-edge run --greedy` on a NeXT package gives transformers' tokens; a second question about the
    same image reuses the cached prefix (its variable-length image tokens included) without changing a token."""
    import json

    from typer.testing import CliRunner

    from llava_edge.cli import app

    pkg = family_models["next-mistral"]["package"]
    path = tmp_path / "portrait.png"
    three_shapes[0].save(path)
    res = CliRunner().invoke(app, ["run", str(pkg), "--image", str(path), "--prompt", QUESTIONS[0], "--greedy",
                                   "--max-new-tokens", str(NEW_TOKENS), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["token_ids"] == next_references("next-mistral")[1][0]

    cached = Pipeline.from_package(pkg, prefix_cache=2)
    cold = Pipeline.from_package(pkg, prefix_cache=0)
    first = cached.generate(three_shapes[0], QUESTIONS[0], max_new_tokens=8)
    again = cached.generate(three_shapes[0], QUESTIONS[0], max_new_tokens=8, history=[(QUESTIONS[0], first.text)])
    assert again.timings.vision_ms == 0.0  # the image tokens came from the cache
    ref = cold.generate(three_shapes[0], QUESTIONS[0], max_new_tokens=8, history=[(QUESTIONS[0], first.text)])
    assert again.token_ids == ref.token_ids


def test_llava_16_token_budget():
    """The real LLaVA-1.6 grid (336 px tiles): at most 5 tiles and 2,928 image tokens per image."""
    cfg = _cfg(336, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    cfg.patch_size, cfg.num_image_tokens = 14, 576
    assert anyres.max_tiles(cfg) == 5 and anyres.max_image_tokens(cfg) == 2928
    assert anyres.num_image_tokens((480, 640), cfg) == 576 + 36 * 49  # 4:3 on the 2x2 grid: 36 rows kept

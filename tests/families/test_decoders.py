"""Mistral, Qwen2, Phi-3 decoders and the SigLIP tower in the llava-hf layout, against transformers:
the checkpoint's own processor and chat template, greedy tokens alone and in a left-padded batch,
decoder logits, the fast decoder, and the family facts the manifest records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_edge.runtime import prompt as prompts
from llava_edge.runtime.pipeline import Pipeline, PromptTooLongError, Request
from llava_edge.runtime.preprocess import preprocess

from .conftest import FAMILIES

NEW_TOKENS = 32
QUESTIONS = ["What is in the picture?", "Where is the small red circle, on the left or on the right of the image?"]


def _processor(ckpt):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(ckpt, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    return proc


def _hf_greedy(model, proc, images, questions) -> tuple[list[list[int]], list[list[int]]]:
    """transformers end to end: the checkpoint's processor and chat template, then generate; returns the
    prompt ids (padding dropped) and each row's new tokens up to its first eos."""
    convs = [prompts.to_messages([(q, None)]) for q in questions]
    for conv, im in zip(convs, images):
        conv[0]["content"][0]["image"] = im
    enc = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS,
                             pad_token_id=proc.tokenizer.pad_token_id)
    n = enc["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, n:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    prompts_ = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
    return prompts_, rows


@pytest.fixture(scope="module")
def references(family_models, images):
    """preset -> (prompt ids, tokens) for [portrait] alone and [portrait, rgba] batched, from transformers."""
    out = {}

    def get(preset):
        if preset not in out:
            m = family_models[preset]
            proc = _processor(m["checkpoint"])
            single = _hf_greedy(m["model"], proc, [images["portrait"]], QUESTIONS[:1])
            batch = _hf_greedy(m["model"], proc, [images["portrait"], images["rgba"]], QUESTIONS)
            out[preset] = {"single": single, "batch": batch}
        return out[preset]

    return get


@pytest.mark.parametrize("preset", FAMILIES)
def test_prompt_ids_equal_the_checkpoint_processor(family_models, references, images, preset):
    """Our renderer + tokenizer + image-token expansion give transformers' processor ids exactly."""
    pipe = Pipeline.from_package(family_models[preset]["package"])
    want, _ = references(preset)["batch"]
    got = [pipe.encode_request(Request([(q, None)], [im])).tolist()
           for q, im in zip(QUESTIONS, [images["portrait"], images["rgba"]])]
    assert got == want


@pytest.mark.parametrize("backend", ["ort", "ort-fast"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_tokens_match_transformers(family_models, references, images, preset, backend):
    pipe = Pipeline.from_package(family_models[preset]["package"], backend=backend)
    ref = references(preset)
    single = pipe.generate(images["portrait"], QUESTIONS[0], max_new_tokens=NEW_TOKENS)
    assert single.token_ids == ref["single"][1][0]
    assert len(single.token_ids) == NEW_TOKENS  # random weights: no early eos, all 32 compared
    batch = pipe.generate_batch([images["portrait"], images["rgba"]], QUESTIONS, max_new_tokens=NEW_TOKENS)
    lengths = [len(p) for p in ref["batch"][0]]
    assert lengths[0] != lengths[1]  # the batch really is left-padded
    assert [r.token_ids for r in batch] == ref["batch"][1]


@pytest.mark.parametrize("preset", FAMILIES)
def test_decoder_logits_within_1e4(family_models, images, preset):
    """Prefill and two decode steps through the runtime's backend vs transformers' forward (fp32)."""
    m = family_models[preset]
    pipe = Pipeline.from_package(m["package"])
    ids = pipe.encode_request(Request([("What colour is it?", None)], [images["grayscale"]]))
    pixels = preprocess(images["grayscale"], pipe.manifest.vision)[None]
    backend = pipe.backend
    embeds = backend.embed(ids[None])
    embeds[0, ids == pipe.manifest.text.image_token_id] = backend.encode_images(pixels)[0]
    cache = backend.new_cache(1, len(ids) + 2)
    ours = [backend.step(cache, embeds, np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None])]
    for j, tok in enumerate([7, 11]):
        mask = np.ones((1, len(ids) + j + 1), np.int64)
        ours.append(backend.step(cache, backend.embed(np.array([[tok]])), mask, np.array([[len(ids) + j]])))
    full = torch.from_numpy(np.concatenate([ids, [7, 11]]))[None]
    with torch.no_grad():
        ref = m["model"](input_ids=full, pixel_values=torch.from_numpy(pixels)).logits[0]
    for j, logits in enumerate(ours):
        np.testing.assert_allclose(logits[0], ref[len(ids) - 1 + j].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset,decoder,vision,template", [
    ("llava-mistral", "mistral", "clip", "mistral_inst"),
    ("llava-phi3", "phi3", "clip", "phi3"),
    ("llava-interleave", "qwen2", "siglip", "chatml"),
])
def test_manifest_records_family_and_template(family_models, preset, decoder, vision, template):
    from typer.testing import CliRunner

    from llava_edge.cli import app
    from llava_edge.package import load_manifest

    m = load_manifest(family_models[preset]["package"])
    assert m.family == {"model": "llava", "decoder": decoder, "vision": vision}
    assert m.text.chat_template == template
    assert m.extra["chat_template_source"].startswith("checkpoint chat_template")
    shown = CliRunner().invoke(app, ["inspect", str(family_models[preset]["package"])])
    assert shown.exit_code == 0 and f"decoder {decoder}, vision {vision}" in shown.output


def test_chat_templates_render_as_transformers(family_models):
    """Multi-turn conversations (beyond the export-time probes) render as transformers renders the
    checkpoint's own Jinja template; the bos the tokenizer adds is not part of ours."""
    convs = [[("Hi?", None)], [("Q1", "A1."), ("Q2 with\nnewline", "A2"), ("Q3", None)]]
    for preset in FAMILIES:
        m = family_models[preset]
        proc = _processor(m["checkpoint"])
        name = Pipeline.from_package(m["package"]).template
        for turns in convs:
            want = proc.apply_chat_template([prompts.to_messages(turns)], add_generation_prompt=True)[0]
            assert prompts.render(name, turns, "<image>", 1) == want, (preset, turns)


def test_unrecognised_or_different_template_falls_back():
    from llava_edge.export.checkpoint import resolve_chat_template
    from llava_edge.export.factory import MISTRAL_CHAT_TEMPLATE

    name, why = resolve_chat_template(MISTRAL_CHAT_TEMPLATE, "mistral", "<image>", "<s>")
    assert name == "mistral_inst" and "equal on probe" in why
    # same markers, one space more after [/INST]: detected, then refused by the rendering check
    name, why = resolve_chat_template(MISTRAL_CHAT_TEMPLATE.replace("' [/INST]'", "' [/INST] '"), "mistral",
                                      "<image>", "<s>")
    assert name == "mistral_inst" and "renders differently" in why
    name, why = resolve_chat_template("{{ messages[0]['content'] }}", "qwen2", "<image>", None)
    assert name == "chatml" and "not recognised" in why
    # llava-1.5-7b-hf's hub template (answers end with ' ', not '</s>'): the second USER/ASSISTANT candidate
    name, why = resolve_chat_template(LLAVA_15_HUB_TEMPLATE, "llama", "<image>", "<s>")
    assert name == "llava_hf_space" and "equal on probe" in why
    from transformers.utils.chat_template_utils import render_jinja_template

    turns = [("Q1", "A1."), ("Q2", "A2"), ("Q3", None)]
    want = render_jinja_template([prompts.to_messages(turns)], chat_template=LLAVA_15_HUB_TEMPLATE,
                                 add_generation_prompt=True)[0][0]
    assert prompts.render("llava_hf_space", turns, "<image>") == want == (
        "USER: <image>\nQ1 ASSISTANT: A1. USER: Q2 ASSISTANT: A2 USER: Q3 ASSISTANT:")


LLAVA_15_HUB_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_context_caps(family_models, images):
    """Mistral's sliding window and Phi-3's longrope cap the package's context, with the reason."""
    from llava_edge.package import load_manifest

    mistral = load_manifest(family_models["llava-mistral"]["package"])
    assert mistral.text.max_context == 160 and "sliding_window=160" in mistral.extra["context_cap"]
    phi3 = load_manifest(family_models["llava-phi3"]["package"])
    assert phi3.text.max_context == 192 and "longrope" in phi3.extra["context_cap"]
    assert "context_cap" not in load_manifest(family_models["llava-interleave"]["package"]).extra
    pipe = Pipeline.from_package(family_models["llava-mistral"]["package"])
    with pytest.raises(PromptTooLongError):
        pipe.generate(images["portrait"], QUESTIONS[0], max_new_tokens=150)


def test_siglip_preprocessing_matches_transformers(images):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from llava_edge.package import VisionConfig

    hf = SiglipImageProcessorPil(size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cfg = VisionConfig(image_size=48, patch_size=8, shortest_edge=48, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                       rescale_factor=1 / 255, resample=3, do_center_crop=False, pad_to_square=False,
                       num_image_tokens=36, vision_feature_layer=-1, select_strategy="full", resize="square")
    for name, im in images.items():
        want = hf(images=im, return_tensors="np")["pixel_values"][0]
        got = preprocess(im, cfg)
        assert got.shape == want.shape == (3, 48, 48), name
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)

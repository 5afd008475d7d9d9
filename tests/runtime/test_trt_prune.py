"""The TensorRT backend takes a pruned (shorter) prompt with the engines it was built with: on the fake
TensorRT of tests/fakes/fake_tensorrt.py, greedy tokens equal onnxruntime's with the same pruning, and the
decoder engine's prefill saw the shorter sequence. In-place and ping-pong engines take position_ids, so kept
tokens keep their original positions as on onnxruntime; the plugin engine's attention rotates by cache slot
(start_pos + j), so it renumbers, and answers as onnxruntime told to renumber."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_edge.runtime.prune import PruneSetting
from llava_edge.trt import presets as tp

from fakes.fake_tensorrt import CHUNK, FakeCudart, fake_package, open_fake

QUESTIONS = ["what is in the picture ?", "count the red circles please"]


@pytest.mark.parametrize("kv_cache", ["ping-pong", "in-place"])
@pytest.mark.parametrize("setting", ["dart:0.5", "cdpruner:0.75"])
def test_pruned_prompt_runs_on_the_same_engines(trt_package, tmp_path, monkeypatch, kv_cache, setting):
    from tokenizers import Tokenizer

    from llava_edge.runtime.ort_backend import OrtBackend
    from llava_edge.runtime.pipeline import Pipeline, Request

    monkeypatch.setattr(tp, "STATIC_PREFILL_CHUNK", CHUNK)  # in-place: prompts go through in chunks
    pkg, m = fake_package(trt_package, tmp_path, kv_cache)
    backend = open_fake(pkg, m, monkeypatch, FakeCudart())
    try:
        tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
        s = PruneSetting.parse(setting)
        ref = Pipeline(pkg, m, OrtBackend(pkg, m, threads=1), tok, prefix_cache=0, prune=s)
        trt = Pipeline(pkg, m, backend, tok, prefix_cache=0, prune=s)
        rng = np.random.default_rng(1)
        pics = [Image.fromarray(rng.integers(0, 255, (30, 41 + 7 * i, 3), dtype=np.uint8)) for i in range(2)]
        one = trt.generate(pics[0], QUESTIONS[0], 8)
        assert one.token_ids == ref.generate(pics[0], QUESTIONS[0], 8).token_ids
        runs = backend.engines["decoder"].context.runs
        n = m.vision.num_image_tokens
        every = ref.encode_request(Request([(QUESTIONS[0], None)], pics[:1]), PruneSetting())
        assert one.prompt_tokens == len(every) - (n - s.kept_count(n)) < len(every)
        prefill = sum(shape[1] for profile, shape in runs if profile == 0)
        assert prefill == one.prompt_tokens  # the engine prefilled the pruned prompt, nothing more
        batch = trt.generate_batch(pics, QUESTIONS, 8)  # one static batch of two
        assert [r.token_ids for r in batch] == [r.token_ids for r in ref.generate_batch(pics, QUESTIONS, 8)]
    finally:
        backend.close()


def test_plugin_engine_renumbers(plugin_package, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from llava_edge.runtime.ort_backend import OrtBackend
    from llava_edge.runtime.pipeline import Pipeline

    class RenumberedOrt(OrtBackend):
        takes_positions = False

    monkeypatch.setattr(tp, "STATIC_PREFILL_CHUNK", CHUNK)
    pkg, m = fake_package(plugin_package, tmp_path, "in-place", plugins="on", version="10.9.0.34")
    backend = open_fake(pkg, m, monkeypatch, FakeCudart())
    try:
        assert not backend.takes_positions  # the plugin derives positions from the cache fill
        tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
        s = PruneSetting.parse("dart:0.5")
        trt = Pipeline(pkg, m, backend, tok, prefix_cache=0, prune=s)
        renumbered = Pipeline(pkg, m, RenumberedOrt(pkg, m, threads=1), tok, prefix_cache=0, prune=s)
        pic = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 41, 3), dtype=np.uint8))
        got = trt.generate(pic, QUESTIONS[0], 8).token_ids
        assert got == renumbered.generate(pic, QUESTIONS[0], 8).token_ids
    finally:
        backend.close()

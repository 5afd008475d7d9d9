"""Pruning through the pipeline and the engine: ratio 0 changes nothing, a pruned prompt is laid out with
the kept count, the engine and the static batch prune alike, and neither cache lets a pruned and an
unpruned request (or two questions of a question-aware method) share features or KV."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_edge.errors import UsageError
from llava_edge.runtime.pipeline import Pipeline, Request, drain
from llava_edge.runtime.prune import PruneSetting
from llava_edge.runtime.sequence import GenerationParams
from llava_edge.watch.loop import WatchConfig, watch
from llava_edge.watch.sources import Frame

Q1, Q2 = "what is in the picture ?", "where is the red circle ?"
TOKENS = 10


@pytest.fixture(scope="module")
def pics():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (30 + 9 * i, 41, 3), dtype=np.uint8)) for i in range(3)]


def _pipe(pkg, backend="ort-fast", prune="off", **kw) -> Pipeline:
    kw.setdefault("prefix_cache", 0)
    pipe = Pipeline.from_package(pkg, backend=backend, threads=1, prune=prune, prefix_cache=kw.pop("prefix_cache"))
    pipe.image_cache_mb = kw.pop("image_cache_mb", 0.0)
    return pipe


@pytest.mark.parametrize("backend", ["ort", "ort-fast"])
def test_ratio_zero_gives_todays_greedy_ids(gqa_fast_package, pics, backend):
    base = _pipe(gqa_fast_package, backend)
    want = [base.generate(im, q, TOKENS).token_ids for im, q in zip(pics, (Q1, Q2, Q1))]
    want_batch = [r.token_ids for r in base.generate_batch(pics[:2], [Q1, Q2], TOKENS)]
    for setting in ("dart:0", "cdpruner:0"):
        pipe = _pipe(gqa_fast_package, backend, setting)
        assert [pipe.generate(im, q, TOKENS).token_ids for im, q in zip(pics, (Q1, Q2, Q1))] == want
        assert [r.token_ids for r in pipe.generate_batch(pics[:2], [Q1, Q2], TOKENS)] == want_batch


@pytest.mark.parametrize("setting", ["dart:0.5", "cdpruner:0.5", "cdpruner:0.75"])
def test_engine_and_static_batch_prune_alike(gqa_fast_package, pics, setting):
    off = _pipe(gqa_fast_package, "ort-fast")
    fast = _pipe(gqa_fast_package, "ort-fast", setting)
    static = _pipe(gqa_fast_package, "ort", setting)  # several requests: one left-padded batch, not the engine
    n = off.manifest.vision.num_image_tokens
    dropped = n - PruneSetting.parse(setting).kept_count(n)
    assert dropped > 0
    alone = [fast.generate(im, q, TOKENS) for im, q in zip(pics[:2], (Q1, Q2))]
    batch = static.generate_batch(pics[:2], [Q1, Q2], TOKENS)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    full = off.generate(pics[0], Q1, TOKENS)
    assert alone[0].prompt_tokens == full.prompt_tokens - dropped
    assert alone[0].token_ids != full.token_ids  # the tiny random model does read its image tokens


def test_several_images_each_pruned(gqa_fast_package, pics):
    setting = "dart:0.5"
    fast, static = _pipe(gqa_fast_package, "ort-fast", setting), _pipe(gqa_fast_package, "ort", setting)
    off = _pipe(gqa_fast_package, "ort-fast")
    req = Request([("compare the two pictures", None)], pics[:2])
    n = off.manifest.vision.num_image_tokens
    ids = fast.encode_request(req)
    assert len(ids) == len(off.encode_request(req)) - 2 * (n - PruneSetting.parse(setting).kept_count(n))
    (a,) = drain(fast.run([req], TOKENS))
    b, _ = drain(static.run([req, Request([(Q1, None)], pics[2:])], TOKENS))  # static batch of two requests
    assert a.token_ids == b.token_ids


def test_make_sequence_refuses_a_prompt_laid_out_for_another_setting(gqa_fast_package, pics):
    pipe = _pipe(gqa_fast_package)
    engine = pipe.make_engine(max_slots=1)
    ids = pipe.encode_request(Request([(Q1, None)], pics[:1]))  # every image token
    with pytest.raises(UsageError, match="image tokens"):
        engine.make_sequence(ids, pics[:1], GenerationParams(4, prune=PruneSetting.parse("dart:0.5")))


def test_prefix_and_image_caches_key_on_the_setting(gqa_fast_package, pics):
    """One pipeline with both caches asked off / pruned / off / question-aware with two questions about the
    same picture: each answer equals a cache-free pipeline's, and a repeat reuses its own KV only."""
    cached = _pipe(gqa_fast_package, prefix_cache=8, image_cache_mb=64)
    fresh = {s: _pipe(gqa_fast_package, prune=s) for s in ("off", "dart:0.5", "cdpruner:0.5")}
    im = pics[0]
    # (setting, question, may reuse KV): the repeat of "off" and dart's second question (dart keeps the same
    # rows whatever the question) reuse their own prefix; a question-aware setting's second question cannot
    for setting, q, reuse in [("off", Q1, False), ("dart:0.5", Q1, False), ("off", Q1, True),
                              ("cdpruner:0.5", Q1, False), ("cdpruner:0.5", Q2, False), ("dart:0.5", Q2, True)]:
        cached.prune = PruneSetting.parse(setting)
        hits = cached.prefix_cache.hits
        got = cached.generate(im, q, TOKENS)
        assert got.token_ids == fresh[setting].generate(im, q, TOKENS).token_ids, (setting, q)
        assert cached.prefix_cache.hits == hits + reuse, (setting, q)
    keys = {e.images for e in cached.prefix_cache.entries.values()}
    assert len(keys) == 4  # off, dart:0.5 (both questions), cdpruner:0.5 x 2 questions
    engine = cached._engine
    assert engine.image_cache.misses >= 1 and engine.image_cache.hits >= 1  # the encoder ran for the first only
    # the same request again (watch's unchanged frame, a kiosk's repeat): its own KV, no vision encoder
    cached.prune = PruneSetting.parse("dart:0.5")
    hits = cached.prefix_cache.hits
    again = cached.generate(im, Q1, TOKENS)
    assert cached.prefix_cache.hits == hits + 1 and again.timings.vision_ms == 0
    assert again.token_ids == fresh["dart:0.5"].generate(im, Q1, TOKENS).token_ids


def test_image_cache_serves_full_and_kept_rows_apart(gqa_fast_package, pics):
    pipe = _pipe(gqa_fast_package, image_cache_mb=64)  # no prefix cache: every request places its features
    fresh = _pipe(gqa_fast_package, prune="dart:0.75")
    for setting in ("dart:0.75", "off", "dart:0.75"):
        pipe.prune = PruneSetting.parse(setting)
        want = (fresh if setting != "off" else _pipe(gqa_fast_package)).generate(pics[1], Q2, TOKENS)
        assert pipe.generate(pics[1], Q2, TOKENS).token_ids == want.token_ids
    cache = pipe._engine.image_cache
    n = pipe.manifest.vision.num_image_tokens
    assert sorted(f.shape[0] for f in cache.entries.values()) == [PruneSetting.parse("dart:0.75").kept_count(n), n]


def test_watch_with_pruning_answers_as_generate(gqa_fast_package, pics, tmp_path):
    pipe = _pipe(gqa_fast_package, prune="cdpruner:0.5", prefix_cache=2)
    frames = [Frame(i * 1.0, im) for i, im in enumerate([pics[0], pics[0], pics[1]])]
    cfg = WatchConfig(Q1, threshold=0.0, max_new_tokens=TOKENS)
    records = list(watch(pipe, frames, cfg))
    ref = _pipe(gqa_fast_package, prune="cdpruner:0.5")
    assert [r["answer"] for r in records] == [ref.generate(im, Q1, TOKENS).text for im in (pics[0], pics[0], pics[1])]
    assert [r["reused"] for r in records] == [False, True, False]

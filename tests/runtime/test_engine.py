"""The continuous-batching engine without HTTP: batching, chunked prefill, slots, cancel and caches
never change a greedy token, and the scheduler keeps its promises (slots, budget, removal)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from llava_edge.runtime.engine import ImageCache, PromptTooLongError
from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.sampling import SamplingConfig
from llava_edge.runtime.scheduler import PREFILL_BUDGET
from llava_edge.runtime.sequence import GenerationParams, Status

CHUNK = 8


@pytest.fixture(scope="module")
def fast_package(gqa_fast_package):
    return gqa_fast_package


@pytest.fixture(scope="module")
def pipe(fast_package):
    return Pipeline.from_package(fast_package, backend="ort-fast", threads=1, prefix_cache=0)


def _requests(images):
    return [
        (Request([("What is in the picture?", None)], [images["landscape"]]), 9),
        (Request([("Describe it.", None)], [images["portrait"]]), 5),
        (Request([("Where is the small red circle, on the left or on the right of the image?", None)],
                 [images["rgba"]]), 12),
        (Request([("Count.", None)], []), 7),
        (Request([("What colour is the sky in this picture, and why?", None)], [images["grayscale"]]), 3),
        (Request([("Say hello.", None)], [images["tiny"]]), 10),
    ]


def _alone(pipe, req, max_tokens, chunk=CHUNK, sampling=None):
    engine = pipe.make_engine(max_slots=1, prefill_chunk=chunk)
    (seq,) = pipe.sequences([req], max_tokens, sampling, engine=engine)
    list(engine.run_until_done([seq]))
    return seq.generated


@pytest.mark.parametrize("budget", [PREFILL_BUDGET, None, 1e6], ids=["default", "one-chunk", "unbounded"])
def test_continuous_batching_matches_each_request_alone(pipe, images, budget):
    """Under the default time budget (chunks per step follow measured costs), one chunk per step, and a
    budget that lets whole prompts through while others decode: the same tokens as alone."""
    reqs = _requests(images)
    engine = pipe.make_engine(max_slots=3, prefill_chunk=CHUNK, prefill_budget=budget)
    seqs = [pipe.sequences([r], n, engine=engine)[0] for r, n in reqs]
    assert max(s.prompt_len for s in seqs) > 3 * CHUNK  # prompts really go through in several chunks
    # staggered arrivals: two now, the rest while those decode; more requests than slots
    engine.add(seqs[0])
    engine.add(seqs[1])
    events, step = [], 0
    pending = list(seqs[2:])
    while not all(s.status is Status.FINISHED for s in seqs):
        if step in (3, 5, 6, 9) and pending:
            engine.add(pending.pop(0))
        events += engine.step()
        assert engine.scheduler.slots_in_use <= 3
        step += 1
        assert step < 500
    assert not pending
    for seq, (req, n) in zip(seqs, reqs):
        assert seq.generated == _alone(pipe, req, n), seq.seq_id
        assert len(seq.generated) == n or seq.finish_reason == "eos"
        assert [e.token_id for e in events if e.seq_id == seq.seq_id] == seq.generated
    assert engine.scheduler.idle() and engine.scheduler.free_slots == 3
    assert not engine.runner.kv.lengths.any()  # freed slots are reset


def test_engine_equals_pipeline_generate(pipe, images):
    """The default chunk (256) covers these prompts: the engine path is Pipeline.generate's path."""
    reqs = _requests(images)[:3]
    engine = pipe.make_engine(max_slots=4)
    seqs = [pipe.sequences([r], n, engine=engine)[0] for r, n in reqs]
    list(engine.run_until_done(seqs))
    for seq, (req, n) in zip(seqs, reqs):
        alone = pipe.generate(req.images[0] if req.images else None, req.turns[0][0], max_new_tokens=n)
        assert seq.generated == alone.token_ids


def test_chunked_prefill_never_stalls_running_decodes(pipe, images):
    # one chunk per step; an image cache (the pipe's default has none) so the warm-up below really caches
    engine = pipe.make_engine(max_slots=3, prefill_chunk=CHUNK, prefill_budget=0, image_cache_mb=1)
    long_req = Request([("Where is the small red circle, on the left or on the right of the image?", None)],
                       [images["rgba"]])
    # the image's features into the engine's image cache first: the measured request then skips the vision
    # thread, which on a busy machine can outlast the short streams (then nothing decodes, and a step with
    # nothing to decode may prefill more than a chunk, as it should)
    list(engine.run_until_done(pipe.sequences([long_req], 1, engine=engine)))
    short = [pipe.sequences([Request([("Count.", None)], [])], 30, engine=engine)[0] for _ in range(2)]
    for s in short:
        engine.add(s)
    while any(s.status is not Status.RUNNING for s in short):
        engine.step()
    (long_seq,) = pipe.sequences([long_req], 4, engine=engine)
    engine.add(long_seq)
    prefill_steps = 0
    while long_seq.status is not Status.RUNNING and long_seq.status is not Status.FINISHED:
        before = long_seq.computed
        got = {e.seq_id for e in engine.step()}
        if long_seq.status is Status.PREFILL or long_seq.first_token_at is not None:
            prefill_steps += 1
            assert long_seq.computed - before <= CHUNK  # at most one chunk of prefill per step
        assert {s.seq_id for s in short} <= got  # ... and every running stream got its token
    assert prefill_steps >= long_seq.prompt_len // CHUNK
    assert engine.image_cache.hits == 1  # the measured request's image came from the cache, as meant


def test_calls_beside_the_vision_encoder_do_not_set_the_budget(fast_package, images):
    """A decode call or chunk that starts while the vision encoder works shares the cores with it, so its time
    must not become the budget's measure (an estimate inflated by them let the first steps after the encoder
    carry several chunks each). While an image request's encoder runs (held here until released), the
    measured costs stay as they were; once it is done, decode calls are measured again."""
    pipe = Pipeline.from_package(fast_package, backend="ort-fast", threads=1, prefix_cache=0)
    engine = pipe.make_engine(max_slots=3, prefill_chunk=CHUNK)
    release, encode = threading.Event(), engine.runner.encode_images
    engine.runner.encode_images = lambda px: release.wait(30) and encode(px)
    streams = [pipe.sequences([Request([("Count.", None)], [])], 40, engine=engine)[0] for _ in range(2)]
    for s in streams:
        engine.add(s)
    for _ in range(4):
        engine.step()
    costs = engine.scheduler.costs
    (newcomer,) = pipe.sequences([Request([("What is in the picture?", None)], [images["landscape"]])], 3,
                                 engine=engine)
    engine.add(newcomer)
    engine.step()  # admitted: its encoder starts (and waits)
    measured = (dict(costs.decode_ms), costs.prefill_ms_per_token)
    assert measured[0] and measured[1] is not None
    for _ in range(4):
        before = [len(s.generated) for s in streams]
        engine.step()
        assert [len(s.generated) for s in streams] == [n + 1 for n in before]  # the streams decode meanwhile
    assert newcomer.vision is not None and (dict(costs.decode_ms), costs.prefill_ms_per_token) == measured
    release.set()
    list(engine.run_until_done([newcomer]))
    assert dict(costs.decode_ms) != measured[0]
    assert newcomer.generated == _alone(pipe, Request([("What is in the picture?", None)], [images["landscape"]]), 3)


def test_cancel_frees_the_slot_and_admits_the_next(pipe, images):
    engine = pipe.make_engine(max_slots=2, prefill_chunk=CHUNK)
    reqs = _requests(images)
    a, b, c = (pipe.sequences([r], 40, engine=engine)[0] for r, _ in reqs[:3])
    for s in (a, b, c):
        engine.add(s)
    for _ in range(12):
        engine.step()
    assert c.status is Status.WAITING and engine.queued == 1
    engine.cancel(a.seq_id)
    events = engine.step()
    assert a.finish_reason == "cancelled" and any(e.finish_reason == "cancelled" for e in events)
    assert c.status is not Status.WAITING and c.slot == 0  # a's slot, same step
    list(engine.run_until_done([]))
    while not engine.scheduler.idle():
        engine.step()
    assert b.generated == _alone(pipe, reqs[1][0], 40) and c.generated == _alone(pipe, reqs[2][0], 40)
    assert engine.scheduler.free_slots == 2 and engine.queued == 0
    engine.cancel(a.seq_id)  # cancelling a finished sequence is harmless
    assert engine.step() == []


def test_seeded_sampling_is_per_request(pipe, images):
    reqs = _requests(images)
    sampled = SamplingConfig(temperature=0.9, top_p=0.9, top_k=20, seed=7, repetition_penalty=1.2)
    engine = pipe.make_engine(max_slots=3, prefill_chunk=CHUNK)
    s0 = pipe.sequences([reqs[0][0]], 10, sampled, engine=engine)[0]
    s1 = pipe.sequences([reqs[1][0]], 10, engine=engine)[0]
    s2 = pipe.sequences([reqs[2][0]], 10, SamplingConfig(temperature=1.5, seed=3), engine=engine)[0]
    list(engine.run_until_done([s0, s1, s2]))
    assert s0.generated == _alone(pipe, reqs[0][0], 10, sampling=sampled)
    assert s1.generated == _alone(pipe, reqs[1][0], 10)
    assert s2.generated == _alone(pipe, reqs[2][0], 10, sampling=SamplingConfig(temperature=1.5, seed=3))


def test_image_cache_encodes_a_frame_once(pipe, images):
    engine = pipe.make_engine(max_slots=2, image_cache_mb=1)
    img = images["landscape"]
    same = Image.fromarray(np.asarray(img).copy())  # another object, same pixels
    s1, s2 = pipe.sequences([Request([("What is it?", None)], [img]), Request([("Why?", None)], [same])], 6,
                            engine=engine)
    list(engine.run_until_done([s1]))
    list(engine.run_until_done([s2]))
    assert engine.image_cache.hits == 1 and engine.image_cache.misses == 1
    assert s1.timings.vision_ms > 0 and s2.timings.vision_ms == 0
    assert s2.generated == _alone(pipe, Request([("Why?", None)], [img]), 6, chunk=256)


def test_image_cache_is_bounded_lru():
    cache = ImageCache(max_mb=1)
    feat = np.zeros((256, 256), np.float32)  # 256 KB
    for d in "abcd":
        cache.put(d, feat)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("e", feat)
    assert list(cache.entries) == ["c", "d", "a", "e"] and cache.bytes <= 2**20
    cache.put("huge", np.zeros((1024, 1024), np.float32))  # larger than the whole cache: not kept
    assert "huge" not in cache.entries


def test_prefix_cache_across_concurrent_requests(fast_package, images):
    pipe = Pipeline.from_package(fast_package, backend="ort-fast", threads=1, prefix_cache=2)
    engine = pipe.make_engine(max_slots=2)
    img = images["portrait"]
    first = pipe.sequences([Request([("Describe it.", None)], [img])], 20, engine=engine)[0]
    engine.add(first)
    while first.status is not Status.RUNNING:
        engine.step()
    second = pipe.sequences([Request([("And the colour?", None)], [img])], 6, engine=engine)[0]
    list(engine.run_until_done([second]))  # runs next to `first`, which keeps decoding
    assert pipe.prefix_cache.hits == 1 and second.timings.vision_ms == 0
    assert second.prefill_start > pipe.manifest.vision.num_image_tokens
    cold = Pipeline.from_package(fast_package, backend="ort-fast", threads=1, prefix_cache=0)
    assert second.generated == cold.generate(img, "And the colour?", max_new_tokens=6).token_ids
    while first.status is not Status.FINISHED:
        engine.step()
    assert first.generated == cold.generate(img, "Describe it.", max_new_tokens=20).token_ids


def test_slot_rows_are_written_in_place(pipe, images):
    engine = pipe.make_engine(max_slots=2, prefill_chunk=CHUNK)
    kv = engine.runner.kv
    buffers = [k.ctypes.data for k in kv.keys]
    a, b = pipe.sequences([_requests(images)[0][0], _requests(images)[3][0]], 4, engine=engine)
    engine.add(a)
    engine.step()
    assert kv.lengths[0] == min(CHUNK, a.prompt_len) and kv.lengths[1] == 0
    assert np.abs(kv.keys[0][1]).sum() == 0  # the other row is untouched by a's prefill
    list(engine.run_until_done([b]))
    assert [k.ctypes.data for k in kv.keys] == buffers


def test_portable_backend_runs_one_sequence_at_a_time(fast_package, images):
    pipe = Pipeline.from_package(fast_package, backend="ort", threads=1, prefix_cache=0)
    engine = pipe.make_engine(max_slots=4)
    assert engine.runner.slots == 1
    reqs = _requests(images)[:3]
    seqs = [pipe.sequences([r], n, engine=engine)[0] for r, n in reqs]
    list(engine.run_until_done(seqs))
    for seq, (req, n) in zip(seqs, reqs):
        ref = pipe.generate(req.images[0] if req.images else None, req.turns[0][0], max_new_tokens=n)
        assert seq.generated == ref.token_ids


def test_too_long_and_bad_settings_are_refused(pipe):
    engine = pipe.make_engine(max_slots=1)
    with pytest.raises(PromptTooLongError):
        engine.make_sequence(np.ones(10, np.int64), params=GenerationParams(pipe.manifest.text.max_context))
    with pytest.raises(ValueError):
        engine.make_sequence(np.ones(10, np.int64), params=GenerationParams(max_tokens=0))


def test_stop_string_cuts_the_streamed_text(pipe, images):
    img = images["landscape"]
    full = pipe.generate(img, "What is in the picture?", max_new_tokens=24)
    text = pipe.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine = pipe.make_engine(max_slots=1)
    (seq,) = pipe.sequences([Request([("What is in the picture?", None)], [img])], 24, stop=[stop], engine=engine)
    streamed = "".join(e.text for e in engine.run_until_done([seq]))
    assert seq.finish_reason == "stop" and stop not in streamed
    assert streamed == text[: text.find(stop)]


def test_pipeline_engine_is_sized_to_the_call(fast_package, images):
    pipe = Pipeline.from_package(fast_package, backend="ort-fast", threads=1, prefix_cache=0)
    one = pipe.generate(images["landscape"], "What is in the picture?", max_new_tokens=5)
    e = pipe._engine
    assert e.runner.slots == 1 and e.runner.max_len < pipe.manifest.text.max_context
    imgs, qs = [images["portrait"], images["rgba"], None], ["Describe it.", "Count.", "Say hello."]
    batch = pipe.generate_batch(imgs, qs, max_new_tokens=5)
    assert pipe._engine.runner.slots == 3  # grown for the batch, up to max_slots
    assert [r.token_ids for r in batch] == [pipe.generate(i, q, max_new_tokens=5).token_ids for i, q in zip(imgs, qs)]
    assert pipe.generate(images["landscape"], "What is in the picture?", max_new_tokens=5).token_ids == one.token_ids


def test_running_streams_decode_while_the_vision_encoder_works(pipe, images):
    import threading

    engine = pipe.make_engine(max_slots=2, prefill_chunk=CHUNK)
    gate = threading.Event()
    encode = engine.runner.encode_images

    def slow_encode(pixels):
        assert gate.wait(30)
        return encode(pixels)

    engine.runner.encode_images = slow_encode
    (running,) = pipe.sequences([Request([("Count.", None)], [])], 30, engine=engine)
    engine.add(running)
    while running.status is not Status.RUNNING:
        engine.step()
    req = Request([("What is in the picture?", None)], [images["landscape"]])
    (late,) = pipe.sequences([req], 6, engine=engine)
    engine.add(late)
    before = len(running.generated)
    for _ in range(5):
        engine.step()
    assert len(running.generated) == before + 5  # one token per step, the vision encoder still busy
    assert late.status is Status.PREFILL and late.vision is not None and late.computed == 0
    gate.set()
    while late.status is not Status.FINISHED:
        engine.step()
    assert late.generated == _alone(pipe, req, 6)

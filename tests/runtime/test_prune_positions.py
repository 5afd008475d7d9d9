"""Pruned image tokens keep their original positions (docs/pruning.md, "Positions"): the fast decoder (RotaryEmbedding
from ``position_ids``, GroupQueryAttention on a densely filled cache) and the portable decoder give transformers'
greedy tokens and logits for the kept embeddings at those positions, through the engine's chunks, batches, prefix
and image caches and the static batch; a fast package exported before the position input still runs, renumbered;
the context check bounds positions by the model and the fill by the cache."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from llava_edge.package import load_manifest
from llava_edge.runtime.engine import PromptTooLongError, check_context
from llava_edge.runtime.ort_backend import OrtBackend
from llava_edge.runtime.pipeline import Pipeline, Request, drain
from llava_edge.runtime.prune import PruneSetting, prompt_positions
from llava_edge.runtime.sequence import GenerationParams

from prune_reference import hf_greedy, kept_prompt

Q1, Q2 = "what is in the picture ?", "where is the red circle ?"
TOKENS = 10
LOGITS_ATOL = 1e-4  # tests/runtime/test_reference_parity.py: the runtime's logits against transformers'


class RenumberedOrt(OrtBackend):
    """The portable backend told it cannot take positions: the engine renumbers, as for an old fast graph."""

    takes_positions = False


@pytest.fixture(scope="module")
def pics():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 255, (30 + 9 * i, 41, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def old_fast_package(tiny_models, tmp_path_factory):
    """The GQA tiny package with a fast decoder as exported before position_ids (positions = cache index)."""
    from llava_edge.export.fast_decoder import export_fast_decoder

    pkg = tmp_path_factory.mktemp("old_fast") / "pkg"
    shutil.copytree(tiny_models["llava-hf-gqa"]["package"], pkg)
    export_fast_decoder(tiny_models["llava-hf-gqa"]["checkpoint"], pkg, positions=False)
    return pkg


def _pipe(pkg, backend="ort-fast", prune="off", prefix_cache=0, image_cache_mb=0.0) -> Pipeline:
    pipe = Pipeline.from_package(pkg, backend=backend, threads=1, prune=prune, prefix_cache=prefix_cache)
    pipe.image_cache_mb = image_cache_mb
    return pipe


def _eos(pipe: Pipeline) -> frozenset[int]:
    return frozenset(pipe.manifest.text.eos_token_ids)


def _renumbered(pkg, prune) -> Pipeline:
    from tokenizers import Tokenizer

    m = load_manifest(pkg)
    return Pipeline(pkg, m, RenumberedOrt(pkg, m, threads=1), Tokenizer.from_file(str(pkg / "tokenizer.json")),
                    prefix_cache=0, prune=prune)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_prompt_positions_keep_every_token_where_it_was():
    img = 9
    ids = np.array([1, 2, img, img, img, 5, img, img, 6, 7])  # two images of 6 and 5 tokens, 3 and 2 kept
    pos = prompt_positions(ids, img, [6, 5], [3, 2], [np.array([0, 2, 5]), np.array([1, 4])])
    # text 0,1; image 1 at 2 + {0,2,5}; text at 8; image 2 from 9: 9 + {1,4}; the text after: 14, 15
    assert pos.tolist() == [0, 1, 2, 4, 7, 8, 10, 13, 14, 15]
    unknown = prompt_positions(ids, img, [6, 5], [3, 2], [None, np.array([1, 4])])  # a reused prefix covers image 1
    assert unknown.tolist() == [0, 1, -1, -1, -1, 8, 10, 13, 14, 15]
    assert prompt_positions(ids, img, [3, 2], [3, 2], [np.arange(3), np.arange(2)]).tolist() == list(range(10))
    with pytest.raises(ValueError, match="ascending"):
        prompt_positions(ids, img, [6, 5], [3, 2], [np.array([0, 2, 6]), np.array([1, 4])])


@pytest.mark.parametrize("setting", ["dart:0.5", "cdpruner:0.75"])
def test_fast_and_portable_give_transformers_tokens_and_logits(tiny_models, gqa_fast_package, pics, setting):
    s = PruneSetting.parse(setting)
    model = tiny_models["llava-hf-gqa"]["model"]
    fast = _pipe(gqa_fast_package, "ort-fast", s)
    assert fast.backend.takes_positions
    embeds, positions = kept_prompt(fast, pics[:1], Q1, s)
    assert positions[-1] + 1 > len(positions)  # the prompt has a gap
    want, want_logits = hf_greedy(model, embeds, positions, TOKENS, _eos(fast))
    # the positions matter to this model: renumbering the same embeddings gives other logits
    renumbered = hf_greedy(model, embeds, np.arange(len(positions)), 1)[1][0]
    assert np.abs(renumbered - want_logits[0]).max() > 100 * LOGITS_ATOL
    for backend in ("ort-fast", "ort"):
        pipe = _pipe(gqa_fast_package, backend, s)
        engine = pipe.make_engine(max_slots=1)
        (seq,) = pipe.sequences([Request([(Q1, None)], pics[:1])], TOKENS, engine=engine, top_logprobs=1)
        list(engine.run_until_done([seq]))
        assert seq.generated == want, backend
        for j, (lp, _) in enumerate(seq.logprobs):
            assert abs(lp - _log_softmax(want_logits[j])[want[j]]) < LOGITS_ATOL, (backend, j)


def test_two_images_and_the_static_batch(tiny_models, gqa_fast_package, pics):
    s = PruneSetting.parse("dart:0.5")
    fast, static = _pipe(gqa_fast_package, "ort-fast", s), _pipe(gqa_fast_package, "ort", s)
    question = "compare the two pictures"
    embeds, positions = kept_prompt(fast, pics[:2], question, s)
    want, _ = hf_greedy(tiny_models["llava-hf-gqa"]["model"], embeds, positions, TOKENS, _eos(fast))
    req = Request([(question, None)], pics[:2])
    assert [r.token_ids for r in _drain(fast, [req])] == [want]
    # a static left-padded batch of two requests on the portable backend: each row at its own positions
    other = Request([(Q1, None)], pics[2:])
    both = _drain(static, [req, other])
    assert [r.token_ids for r in both] == [want, _drain(fast, [other])[0].token_ids]


def _drain(pipe: Pipeline, requests):
    return drain(pipe.run(requests, TOKENS))


def test_chunked_prefill_equals_one_chunk(gqa_fast_package, pics):
    """Chunk boundaries inside the image and after it: the same positions, the same tokens."""
    pipe = _pipe(gqa_fast_package, "ort-fast", "cdpruner:0.5")
    whole = pipe.make_engine(max_slots=1, prefill_chunk=256)
    small = pipe.make_engine(max_slots=1, prefill_chunk=7)
    out = []
    for engine in (whole, small):
        seqs = pipe.sequences([Request([(Q2, None)], pics[:2])], TOKENS, engine=engine)
        list(engine.run_until_done(seqs))
        out.append(seqs[0].generated)
    assert out[0] == out[1]
    assert seqs[0].prompt_len > 2 * 7 and seqs[0].positions is not None


def test_pruned_and_unpruned_batched_equal_alone(gqa_fast_package, pics):
    pipe = _pipe(gqa_fast_package, "ort-fast")
    settings = [PruneSetting.parse("dart:0.75"), PruneSetting()]
    reqs = [Request([(Q1, None)], pics[:1]), Request([(Q2, None)], pics[1:2])]

    def seqs(engine, which):
        return [engine.make_sequence(pipe.encode_request(reqs[i], settings[i]), reqs[i].images,
                                     GenerationParams(TOKENS, prune=settings[i]), index=i) for i in which]

    alone = []
    for i in range(2):
        engine = pipe.make_engine(max_slots=1, prefill_chunk=16)
        (seq,) = seqs(engine, [i])
        list(engine.run_until_done([seq]))
        alone.append(seq.generated)
    engine = pipe.make_engine(max_slots=2, prefill_chunk=16)
    both = seqs(engine, [0, 1])
    list(engine.run_until_done(both))
    assert [s.generated for s in both] == alone
    assert both[0].position_offset > 0 and both[1].positions is None


def test_prefix_reuse_of_a_pruned_image(gqa_fast_package, pics):
    """dart keeps the same rows whatever the question: a second question reuses the image's KV (computed at the
    original positions) and answers as a cache-free pipeline; so does the same request again (every image token
    in the prefix, the selection not even known)."""
    cached = _pipe(gqa_fast_package, "ort-fast", "dart:0.5", prefix_cache=4, image_cache_mb=64)
    fresh = _pipe(gqa_fast_package, "ort-fast", "dart:0.5")
    for q, reuse in [(Q1, False), (Q2, True), (Q2, True)]:
        hits = cached.prefix_cache.hits
        assert cached.generate(pics[0], q, TOKENS).token_ids == fresh.generate(pics[0], q, TOKENS).token_ids, q
        assert cached.prefix_cache.hits == hits + reuse


def test_ratio_zero_and_off_are_todays_graph(gqa_fast_package, old_fast_package, pics):
    """The new graph (RotaryEmbedding + GQA without rotary) answers as the old one (GQA's fused rotary) when
    nothing is pruned, alone and in a ragged batch."""
    old = _pipe(old_fast_package, "ort-fast")
    assert not old.backend.takes_positions
    want = [old.generate(im, q, TOKENS).token_ids for im, q in zip(pics, (Q1, Q2, Q1))]
    want_batch = [r.token_ids for r in old.generate_batch(pics, [Q1, Q2, Q1], TOKENS)]
    for setting in ("off", "dart:0"):
        new = _pipe(gqa_fast_package, "ort-fast", setting)
        assert [new.generate(im, q, TOKENS).token_ids for im, q in zip(pics, (Q1, Q2, Q1))] == want
        assert [r.token_ids for r in new.generate_batch(pics, [Q1, Q2, Q1], TOKENS)] == want_batch


@pytest.mark.parametrize("setting", ["dart:0.5", "cdpruner:0.75"])
def test_old_fast_package_runs_renumbered(tiny_models, gqa_fast_package, old_fast_package, pics, setting):
    """A fast decoder without position_ids: pruning still runs, with consecutive positions: the portable decoder
    told to renumber and transformers at positions 0..T-1 answer the same."""
    s = PruneSetting.parse(setting)
    old = _pipe(old_fast_package, "ort-fast", s)
    got = old.generate(pics[0], Q1, TOKENS)
    assert got.token_ids == _renumbered(old_fast_package, s).generate(pics[0], Q1, TOKENS).token_ids
    embeds, positions = kept_prompt(old, pics[:1], Q1, s)
    model = tiny_models["llava-hf-gqa"]["model"]
    assert got.token_ids == hf_greedy(model, embeds, np.arange(len(positions)), TOKENS, _eos(old))[0]
    new = _pipe(gqa_fast_package, "ort-fast", s).generate(pics[0], Q1, TOKENS)
    assert new.token_ids == hf_greedy(model, embeds, positions, TOKENS, _eos(old))[0]


def test_context_check_bounds_positions_and_fill():
    check_context(100, 10, 128, span=118, max_positions=128)
    with pytest.raises(PromptTooLongError, match="original positions"):
        check_context(100, 10, 128, span=119, max_positions=128)
    with pytest.raises(PromptTooLongError, match="context of 100"):
        check_context(100, 10, 100, span=100, max_positions=128)


def test_engine_refuses_what_only_renumbering_fits(gqa_fast_package, old_fast_package, pics):
    """Pruned at original positions, the answer ends where the unpruned prompt's would: the model's context bounds
    it, although the (shorter) cache fill would fit; renumbered, it fits."""
    s = PruneSetting.parse("dart:0.75")
    new, old = _pipe(gqa_fast_package, "ort-fast", s), _pipe(old_fast_package, "ort-fast", s)
    m = new.manifest
    ids = new.encode_request(Request([(Q1, None)], pics[:1]))
    dropped = m.vision.num_image_tokens - s.kept_count(m.vision.num_image_tokens)
    room = m.text.max_context - len(ids)  # answer tokens the pruned prompt leaves in the cache
    engine = new.make_engine(max_slots=1)
    with pytest.raises(PromptTooLongError, match="original positions"):
        engine.make_sequence(ids, pics[:1], GenerationParams(room, prune=s))
    engine.make_sequence(ids, pics[:1], GenerationParams(room - dropped, prune=s))
    old.make_engine(max_slots=1).make_sequence(ids, pics[:1], GenerationParams(room, prune=s))


def test_static_batch_refuses_what_only_renumbering_fits(gqa_fast_package, pics):
    """The static batch (portable backend, several requests) applies the same bound as the engine, to its
    longest span; renumbered (a backend without positions), the same batch fits."""
    s = PruneSetting.parse("dart:0.75")
    pipe = _pipe(gqa_fast_package, "ort", s)
    m = pipe.manifest
    reqs = [Request([(Q1, None)], pics[:1]), Request([(Q2, None)], pics[1:2])]
    longest = max(len(pipe.encode_request(r)) for r in reqs)
    dropped = m.vision.num_image_tokens - s.kept_count(m.vision.num_image_tokens)
    room = m.text.max_context - longest
    with pytest.raises(PromptTooLongError, match="original positions"):
        drain(pipe.run(reqs, room))
    assert len(drain(pipe.run(reqs, room - dropped))) == 2
    assert len(drain(_renumbered(gqa_fast_package, s).run(reqs, room))) == 2  # only the cache bounds it


def test_a_graph_without_positions_refuses_other_positions(old_fast_package):
    """Positions other than the cache fill would be silently ignored by GroupQueryAttention's own rotary: the old
    graph's backend refuses them in one line instead (the engine never sends them to it)."""
    from llava_edge.runtime.backend import BackendError
    from llava_edge.runtime.fast_backend import FastOrtBackend

    m = load_manifest(old_fast_package)
    be = FastOrtBackend(old_fast_package, m, threads=1)
    assert not be.takes_positions
    emb = be.embed(np.array([[5, 6, 7]]))
    kv = be.new_slot_cache(2, 16)
    be.prefill_slot(kv, 0, emb, positions=np.arange(3))  # the cache indices: fine
    with pytest.raises(BackendError, match="position_ids"):
        be.prefill_slot(kv, 1, emb, positions=np.array([0, 1, 5]))
    with pytest.raises(BackendError, match="position_ids"):
        be.decode_slots(kv, be.embed(np.array([[9], [9]])), np.array([True, False]), positions=np.array([7, 0]))
    cache = be.new_cache(1, 16)
    be.step(cache, emb, np.ones((1, 3), np.int64), np.arange(3)[None])
    with pytest.raises(BackendError, match="position_ids"):
        be.step(cache, be.embed(np.array([[9]])), np.ones((1, 4), np.int64), np.array([[8]]))

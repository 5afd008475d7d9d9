"""The TensorRT backend's plugin-engine binding mode (runtime/kv_plugin.py) against the fake
tensorrt/cuda-python of tests/fakes/fake_tensorrt.py.

The fake 'engine' runs the plugin-attention decoder graph (trt/plugin_decoder.py, what `llava-edge
build --plugins on` gives TensorRT) in ``onnx.reference`` with the plugin nodes as our torch references
or our Triton kernels (TRITON_INTERPRET=1 on CPU, set by the root conftest), on the fake device memory itself: the cache
buffers the backend binds are updated in place, and the fake refuses a present.* output not bound to its past
input's buffer. Fake cudaMalloc memory is NaN, and the plugin cache is not zeroed, so any read of a
cache slot at or past a row's length turns the logits into NaN.

Compared with the onnxruntime backend over the portable decoder (left-padded batch + mask): greedy
tokens through the Pipeline (a left-padded batch of 2 prompts of different lengths, then batch 1) and
step logits (ragged prefill, tokens added to a non-empty cache, decode steps). Plugin engines need
head_dim >= 32: the ``plugin_package`` fixture (tests/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_edge.trt import presets as tp
from llava_edge.contract import KV_PLUGIN, RECORD_NAME
from llava_edge.runtime.backend import BackendError
from llava_edge.runtime.kv_plugin import PluginKV, RaggedRows

from fakes.fake_tensorrt import BATCHES, CHUNK, FakeCudart, fake_package, generate, open_fake

VERSION = "10.9.0.34"


@pytest.fixture
def plugin_engines(plugin_package, tmp_path, monkeypatch):
    """Plugin-attention engines (TensorRT 10.9, --plugins on) with a prefill chunk of 8 tokens."""
    monkeypatch.setattr(tp, "STATIC_PREFILL_CHUNK", CHUNK)
    return fake_package(plugin_package, tmp_path, "in-place", plugins="on", version=VERSION)


@pytest.fixture
def ort_tokens(plugin_engines):
    from llava_edge.runtime.ort_backend import OrtBackend

    pkg, m = plugin_engines
    return generate(pkg, m, OrtBackend(pkg, m, threads=2), BATCHES)


def test_record_says_plugin_and_backend_binds_plugin_kv(plugin_engines, monkeypatch):
    pkg, m = plugin_engines
    rec = json.loads((pkg / "engines" / RECORD_NAME).read_text())
    assert rec["attention"] == "plugin" and rec["plugins"] == ["prefill_attention"] and rec["kv_cache"] == "in-place"
    be = open_fake(pkg, m, monkeypatch, FakeCudart())
    try:
        assert isinstance(be.kv, PluginKV) and be.kv.layout == KV_PLUGIN and be.cuda_graphs
        assert (be.max_batch, be.max_context, be.max_prompt) == (2, 96, CHUNK)
        t = m.text
        # one buffer per layer k/v at max batch x max context; no new.* staging, no device present.* buffers
        assert be.kv.device_bytes == 2 * t.num_layers * 2 * t.num_kv_heads * 96 * t.head_dim * 4
        assert not [k for k in be.dev if k[1].startswith(("present.", "new.", "past_key_values."))]
    finally:
        be.close()


def test_plugin_engine_tokens_match_onnxruntime(plugin_engines, ort_tokens, monkeypatch):
    pkg, m = plugin_engines
    cudart = FakeCudart()
    be = open_fake(pkg, m, monkeypatch, cudart)
    try:
        mallocs = cudart.mallocs
        assert generate(pkg, m, be, BATCHES) == ort_tokens
        assert cudart.mallocs == mallocs  # nothing allocated per request or per token
        assert cudart.d2d_bytes == 0  # no new.* scatter: the plugin wrote the cache
        dec = be.engines["decoder"]
        ctx = dec.context
        # the cache buffers are bound as both the past input and the aliased present output
        for j, (pn, on) in enumerate(zip(be.kv.past_names, be.kv.present_names)):
            assert ctx.addr[pn] == ctx.addr[on] == be.kv.buffers[j].ptr
        assert dec.engine.in_place_bytes > 0
        # one decode graph per batch size (2, then 1), replayed for every later decode step
        assert cudart.captures == be.graphs.captures == 2 and set(be.graphs.graphs) == {1, 2}
        decode_runs = [s for p, s in ctx.runs if p == 1]
        assert len(decode_runs) >= 2 * 9 and all(s[1] == 1 for s in decode_runs)  # + 1-token prompt chunks
        assert ctx.replays == cudart.launches == len(decode_runs) - 2
        # the batch of 2 was ragged: right-padded rows with their own lengths, in chunks of <= 8 tokens
        prefill = [x for x, (p, s) in zip(ctx.lengths, ctx.runs) if p == 0]
        assert all(s[1] <= CHUNK for p, s in ctx.runs if p == 0)
        assert prefill[0]["start_pos"] == [0, 0]
        assert any(0 in x["prompt_lens"] for x in prefill)  # the shorter row sits out the last chunk(s)
        decode_lens = [x for x, (p, s) in zip(ctx.lengths, ctx.runs) if p == 1]
        first_decode = decode_lens[0]
        assert first_decode["prompt_lens"] == [1, 1] and first_decode["start_pos"][0] != first_decode["start_pos"][1]
    finally:
        be.close()
    assert not cudart.live_graphs and not cudart.device


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_plugin_steps_match_onnxruntime(plugin_package, tmp_path, monkeypatch, impl):
    """Ragged left-padded prefill (6 and 3 tokens), 11 tokens added to the non-empty cache (two chunks),
    then decode steps (captured, replayed): each row's logits at its last real token."""
    from llava_edge.runtime.ort_backend import OrtBackend

    monkeypatch.setattr(tp, "STATIC_PREFILL_CHUNK", CHUNK)
    pkg, m = fake_package(plugin_package, tmp_path, "in-place", plugins="on", version=VERSION, impl=impl)
    cudart = FakeCudart()
    be, oe = open_fake(pkg, m, monkeypatch, cudart), OrtBackend(pkg, m, threads=2)
    try:
        rng = np.random.default_rng(5)
        cache, oc = be.new_cache(2, 40), oe.new_cache(2, 40)
        mask = np.zeros((2, 0), np.int64)
        steps = (6, 11, 1, 1) if impl == "triton" else (6, 11, 1, 1, 1)
        for i, t in enumerate(steps):
            ids = rng.integers(3, m.text.vocab_size - 1, (2, t))
            emb = oe.embed(ids)
            new = np.ones((2, t), np.int64)
            if i == 0:
                new[1, :3] = 0  # row 1 left-padded: 3 real tokens
            mask = np.concatenate([mask, new], axis=1)
            pos = np.maximum(mask.cumsum(-1) - 1, 0)[:, -t:]
            got, want = be.step(cache, emb, mask, pos), oe.step(oc, emb, mask, pos)
            assert not np.isnan(got).any()
            np.testing.assert_allclose(got, want, atol=1e-4)
        assert cache.length == sum(steps) and cache.lengths.tolist() == [sum(steps), sum(steps) - 3]
        assert cudart.captures == 1 and cudart.launches == len(steps) - 3
        with pytest.raises(BackendError, match="position_ids"):
            be.step(cache, emb[:, :1], np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 5)
    finally:
        be.close()


def test_fake_refuses_present_not_bound_to_its_past(plugin_engines, monkeypatch):
    """The check the aliasing tests rely on can fail: present.* bound elsewhere is caught."""
    pkg, m = plugin_engines
    be = open_fake(pkg, m, monkeypatch, FakeCudart())
    try:
        other = be.dev["decoder", "logits"].ptr

        def bad_bind(ctx, cache, b):
            PluginKV.bind(be.kv, ctx, cache, b)
            ctx.set_tensor_address(be.kv.present_names[0], other)

        monkeypatch.setattr(be.kv, "bind", bad_bind)
        cache = be.new_cache(1, 10)
        e = np.zeros((1, 2, m.text.hidden_size), np.float32)
        with pytest.raises(AssertionError, match="aliased"):
            be.step(cache, e, np.ones((1, 2), np.int64), np.arange(2)[None])
    finally:
        be.close()


def test_ragged_rows_pack_and_chunks():
    emb = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    packed, n = RaggedRows.pack(emb, mask)
    assert n.tolist() == [3, 5] and packed[0, :3, 0].tolist() == [2, 3, 4]
    assert packed[1, :, 0].tolist() == [5, 6, 7, 8, 9]
    chunks = list(RaggedRows.chunks(packed, n, np.array([4, 0], np.int32), 2))
    assert [c.prompt_lens.tolist() for c in chunks] == [[2, 2], [1, 2], [0, 1]]
    assert [c.start_pos.tolist() for c in chunks] == [[4, 0], [6, 2], [8, 4]]
    assert [c.last.tolist() for c in chunks] == [[-1, -1], [0, -1], [-1, 0]]

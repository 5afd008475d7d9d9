"""The TensorRT backend's own logic on CPU, against the fake ``tensorrt`` + ``cuda-python`` of
tests/fakes/fake_tensorrt.py (what it runs and what it enforces is described there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import llava_edge.runtime.trt_backend as tb
from llava_edge.trt import presets as tp
from llava_edge.contract import RECORD_NAME, EngineMismatchError
from llava_edge.runtime.backend import BackendError

from fakes.fake_tensorrt import BATCHES, CHUNK, FakeCudart, fake_package, generate, open_fake


@pytest.fixture
def fake_backend(trt_package, tmp_path, monkeypatch):
    """Ping-pong engines (the portable decoder graph)."""
    pkg, m = fake_package(trt_package, tmp_path, "ping-pong")
    cudart = FakeCudart()
    backend = open_fake(pkg, m, monkeypatch, cudart)
    yield pkg, m, backend, cudart
    backend.close()


@pytest.fixture
def inplace_package(trt_package, tmp_path, monkeypatch):
    """In-place engines with a prefill chunk of 8 tokens, so that prompts go through in several chunks."""
    monkeypatch.setattr(tp, "STATIC_PREFILL_CHUNK", CHUNK)
    return fake_package(trt_package, tmp_path, "in-place")


def test_pipeline_tokens_match_onnxruntime(fake_backend):
    from tokenizers import Tokenizer

    from llava_edge.runtime.ort_backend import OrtBackend
    from llava_edge.runtime.pipeline import Pipeline

    pkg, m, backend, cudart = fake_backend
    assert (backend.max_batch, backend.max_context) == (2, 96)
    mallocs = cudart.mallocs
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    ref = Pipeline(pkg, m, OrtBackend(pkg, m, threads=2), tok)
    trt = Pipeline(pkg, m, backend, tok)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 41, 3), dtype=np.uint8))
    a = ref.generate_batch([img, None], ["what is in the picture ?", "count the red circles please"], max_new_tokens=10)
    b = trt.generate_batch([img, None], ["what is in the picture ?", "count the red circles please"], max_new_tokens=10)
    assert [r.token_ids for r in b] == [r.token_ids for r in a]
    assert cudart.mallocs == mallocs  # nothing allocated per request or per token
    runs = backend.engines["decoder"].context.runs
    assert runs[0][0] == 0 and runs[0][1][1] > 1  # prefill profile first
    assert all(p == 1 and s[1] == 1 for p, s in runs[1:])  # then decode, one token each


def test_step_logits_and_continued_prefill(fake_backend):
    from llava_edge.runtime.ort_backend import OrtBackend

    pkg, m, be, _ = fake_backend
    oe = OrtBackend(pkg, m, threads=2)
    ids = np.array([[1, 5, 9, 7], [1, 8, 8, 2]], dtype=np.int64)
    emb = be.embed(ids)
    np.testing.assert_array_equal(emb, oe.embed(ids))
    mask, pos = np.ones((2, 4), np.int64), np.tile(np.arange(4), (2, 1))
    cache, oc = be.new_cache(2, 20), oe.new_cache(2, 20)
    np.testing.assert_allclose(be.step(cache, emb, mask, pos), oe.step(oc, emb, mask, pos), atol=1e-6)
    more = oe.embed(np.array([[3, 4, 6], [5, 6, 7]], np.int64))  # 3 tokens on a non-empty cache
    mask2, pos2 = np.ones((2, 7), np.int64), np.tile(np.arange(4, 7), (2, 1))
    np.testing.assert_allclose(be.step(cache, more, mask2, pos2), oe.step(oc, more, mask2, pos2), atol=1e-5)
    assert cache.length == 7
    one = oe.embed(np.array([[9], [9]], np.int64))
    mask3, pos3 = np.ones((2, 8), np.int64), np.full((2, 1), 7)
    np.testing.assert_allclose(be.step(cache, one, mask3, pos3), oe.step(oc, one, mask3, pos3), atol=1e-5)


def test_backend_limits_and_stale_cache(fake_backend):
    _, _, be, _ = fake_backend
    with pytest.raises(BackendError, match="max batch 2"):
        be.new_cache(3, 10)
    with pytest.raises(BackendError, match="max context 96"):
        be.new_cache(1, 97)
    old = be.new_cache(1, 10)
    be.new_cache(1, 10)
    e = np.zeros((1, 1, be.manifest.text.hidden_size), np.float32)
    with pytest.raises(BackendError, match="superseded"):
        be.step(old, e, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    c = be.new_cache(1, 2)
    be.step(c, e, np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    be.step(c, e, np.ones((1, 2), np.int64), np.ones((1, 1), np.int64))
    with pytest.raises(BackendError, match="KV cache full"):
        be.step(c, e, np.ones((1, 3), np.int64), np.full((1, 1), 2))


def test_close_frees_everything(fake_backend):
    _, _, be, cudart = fake_backend
    assert cudart.device and cudart.pinned
    be.close()
    assert not cudart.device and not cudart.pinned


# ------------------------------------------------------------------------------ in-place + CUDA graphs
@pytest.fixture
def ort_tokens(inplace_package):
    from llava_edge.runtime.ort_backend import OrtBackend

    pkg, m = inplace_package
    return generate(pkg, m, OrtBackend(pkg, m, threads=2), BATCHES)


def test_inplace_cuda_graph_tokens_match_onnxruntime(inplace_package, ort_tokens, monkeypatch):
    pkg, m = inplace_package
    cudart = FakeCudart()
    be = open_fake(pkg, m, monkeypatch, cudart)
    try:
        assert be.kv.layout == "in-place" and be.cuda_graphs
        assert (be.max_batch, be.max_context, be.max_prompt) == (2, 96, CHUNK)
        mallocs = cudart.mallocs
        assert generate(pkg, m, be, BATCHES) == ort_tokens
        assert cudart.mallocs == mallocs  # nothing allocated per request or per token
        # one graph per batch size (2, then 1), replayed for every later decode step
        assert cudart.captures == be.graphs.captures == 2 and set(be.graphs.graphs) == {1, 2}
        ctx = be.engines["decoder"].context
        decode_runs = [s for p, s in ctx.runs if p == 1]
        # 9 decode steps per request (the first token comes from the prefill), plus a prompt chunk of 1
        assert len(decode_runs) >= 2 * 9 and all(s[1] == 1 for s in decode_runs)
        assert ctx.replays == cudart.launches == be.graphs.launches == len(decode_runs) - 2
        # prompts longer than the chunk went through the prefill profile in several passes
        prefill_runs = [s for p, s in ctx.runs if p == 0]
        assert all(s[1] <= CHUNK for s in prefill_runs) and len(prefill_runs) > len(BATCHES)
        # the scatter moved this step's k/v only: (B * kvH) rows of T * D per layer k/v, never the cache
        t = m.text
        kv_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4
        assert cudart.d2d_bytes == kv_token * sum(s[0] * s[1] for _, s in ctx.runs)
    finally:
        be.close()
    assert not cudart.live_graphs and not cudart.device  # graphs destroyed, memory freed


def test_inplace_cache_is_one_buffer(inplace_package, fake_backend, monkeypatch):
    pkg, m = inplace_package
    be = open_fake(pkg, m, monkeypatch, FakeCudart())
    try:
        t = m.text
        per_layer = 2 * t.num_kv_heads * 96 * t.head_dim * 4  # max batch 2, context 96, fp32
        assert be.kv.device_bytes == 2 * t.num_layers * per_layer
        assert fake_backend[2].kv.device_bytes == 2 * be.kv.device_bytes  # ping-pong: two slabs
    finally:
        be.close()


def test_inplace_steps_match_onnxruntime(inplace_package, monkeypatch):
    """Prefill, tokens added to a non-empty cache (one pass and chunked), decode (captured, replayed)."""
    from llava_edge.runtime.ort_backend import OrtBackend

    pkg, m = inplace_package
    cudart = FakeCudart()
    be, oe = open_fake(pkg, m, monkeypatch, cudart), OrtBackend(pkg, m, threads=2)
    try:
        rng = np.random.default_rng(5)
        cache, oc = be.new_cache(2, 40), oe.new_cache(2, 40)
        n = 0
        for t in (4, 3, 11, 1, 1, 1):
            ids = rng.integers(3, m.text.vocab_size - 1, (2, t))
            emb = oe.embed(ids)
            mask = np.ones((2, n + t), np.int64)
            mask[0, :2] = 0  # row 0 left-padded
            pos = np.tile(np.arange(n, n + t), (2, 1))
            np.testing.assert_allclose(be.step(cache, emb, mask, pos), oe.step(oc, emb, mask, pos), atol=1e-5)
            n += t
        assert cache.length == n == 21
        assert cudart.captures == 1 and cudart.launches == 2
    finally:
        be.close()


@pytest.mark.parametrize("failure", ["begin", "execute", "instantiate", "off", "env"])
def test_capture_failure_falls_back_to_plain_execution(inplace_package, ort_tokens, monkeypatch, caplog, failure):
    pkg, m = inplace_package
    cudart = FakeCudart(fail_capture=None if failure in ("off", "env") else failure)
    if failure == "env":
        monkeypatch.setenv(tb.CUDA_GRAPHS_ENV, "0")
    be = open_fake(pkg, m, monkeypatch, cudart, **({"cuda_graphs": False} if failure == "off" else {}))
    try:
        with caplog.at_level("WARNING", logger="llava_edge.runtime.trt_cuda_graph"):
            assert generate(pkg, m, be, BATCHES) == ort_tokens
        assert not be.cuda_graphs and be.graphs.disabled_reason
        assert cudart.launches == 0 and cudart.capturing is None and not cudart.live_graphs
        if failure in ("off", "env"):
            assert "cuda_graphs=False" in be.graphs.disabled_reason and not caplog.records
        else:
            assert len(caplog.records) == 1 and "without CUDA graphs" in caplog.records[0].getMessage()
            assert {"begin": "BeginCapture", "execute": "returned False", "instantiate": "Instantiate"}[failure] \
                in be.graphs.disabled_reason
    finally:
        be.close()


def test_record_layout_must_match_engine(inplace_package, monkeypatch):
    pkg, m = inplace_package
    rec = json.loads((pkg / "engines" / RECORD_NAME).read_text())
    spec = json.loads((pkg / "engines" / "decoder.plan").read_text())
    spec["onnx"] = str(pkg / "decoder.onnx")  # a portable engine under an in-place record
    data = json.dumps(spec).encode()
    (pkg / "engines" / "decoder.plan").write_bytes(data)
    rec["engines"]["decoder"]["size_bytes"] = len(data)
    (pkg / "engines" / RECORD_NAME).write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match="no tensor new.0.key"):
        open_fake(pkg, m, monkeypatch, FakeCudart())
    rec["kv_cache"] = "paged"
    (pkg / "engines" / RECORD_NAME).write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match="kv_cache 'paged'"):
        open_fake(pkg, m, monkeypatch, FakeCudart())


def test_plugin_record_needs_a_plugin_engine_and_an_inplace_cache(trt_package, tmp_path, monkeypatch):
    """The binding mode comes from the record: attention "plugin" binds present.* (aliased caches), so a
    standard-op engine under such a record is a clear error, not a crash, and so is a plugin record that
    claims a ping-pong cache."""
    pkg, m = fake_package(trt_package, tmp_path, "in-place")
    rec_path = pkg / "engines" / RECORD_NAME
    rec = json.loads(rec_path.read_text())
    rec["attention"], rec["plugins"] = "plugin", ["prefill_attention"]
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match="no tensor present.0.key"):
        open_fake(pkg, m, monkeypatch, FakeCudart())
    rec["kv_cache"] = "ping-pong"
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match="one in-place cache"):
        open_fake(pkg, m, monkeypatch, FakeCudart())

"""Real engines: build the tiny package with TensorRT and compare greedy tokens with onnxruntime.

These need NVIDIA TensorRT + cuda-python + a CUDA GPU and skip with the reason otherwise (no TensorRT
was available where this repository was tested, so they have not run yet).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def built_package(trt_gpu, trt_package, tmp_path_factory):
    from llava_edge.trt.builder import build_engines

    pkg = tmp_path_factory.mktemp("trt_engines") / "package"
    shutil.copytree(trt_package, pkg)
    stages: list[str] = []
    result = build_engines(pkg, target="auto", max_batch=2, max_context=128, workspace_gb=0.5,
                           on_stage=stages.append)
    assert result.built and (pkg / "engines" / "engines.json").is_file()
    assert (pkg / "engines" / "build.log").read_text().strip()
    assert any(s.startswith("build decoder") for s in stages)
    assert result.record.kv_cache == "in-place" and not list(pkg.glob(".decoder_static*"))
    return pkg


def _pipelines(pkg):
    from tokenizers import Tokenizer

    from llava_edge.package import load_manifest
    from llava_edge.runtime.ort_backend import OrtBackend
    from llava_edge.runtime.pipeline import Pipeline
    from llava_edge.runtime.trt_backend import TrtBackend

    m = load_manifest(pkg)
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    return Pipeline(pkg, m, OrtBackend(pkg, m, threads=2), tok), Pipeline(pkg, m, TrtBackend(pkg, m), tok)


def test_greedy_tokens_match_onnxruntime(built_package):
    ort_pipe, trt_pipe = _pipelines(built_package)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    for image, prompt in [(img, "what is in the picture ?"), (None, "tell me about the cat")]:
        a = ort_pipe.generate(image, prompt, max_new_tokens=12)
        b = trt_pipe.generate(image, prompt, max_new_tokens=12)
        assert b.token_ids == a.token_ids, (prompt, a.token_ids, b.token_ids)
    graphs = trt_pipe.backend.graphs  # decode steps ran from a captured CUDA graph (or say why not)
    assert graphs.enabled and graphs.captures == 1 and graphs.launches > 0, graphs.disabled_reason


def test_batch_and_logits_close(built_package):
    ort_pipe, trt_pipe = _pipelines(built_package)
    prompts = ["describe the shape", "what colour is the square on the left ?"]
    a = ort_pipe.generate_batch([None, None], prompts, max_new_tokens=8)
    b = trt_pipe.generate_batch([None, None], prompts, max_new_tokens=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    be, oe = trt_pipe.backend, ort_pipe.backend
    ids = np.array([[1, 5, 9, 7]], dtype=np.int64)
    emb = oe.embed(ids)
    np.testing.assert_allclose(be.embed(ids), emb, atol=1e-5)
    mask = np.ones((1, 4), np.int64)
    pos = np.arange(4, dtype=np.int64)[None]
    lo = oe.step(oe.new_cache(1, 16), emb, mask, pos)
    cache = be.new_cache(1, 16)
    lt = be.step(cache, emb, mask, pos)
    np.testing.assert_allclose(lt, lo, atol=2e-3, rtol=2e-3)
    # prefill on a non-empty cache goes through the decode profile token by token
    more = oe.embed(np.array([[3, 4]], dtype=np.int64))
    lt2 = be.step(cache, more, np.ones((1, 6), np.int64), np.array([[4, 5]], np.int64))
    oc = oe.new_cache(1, 16)
    oe.step(oc, emb, mask, pos)
    lo2 = oe.step(oc, more, np.ones((1, 6), np.int64), np.array([[4, 5]], np.int64))
    np.testing.assert_allclose(lt2, lo2, atol=2e-3, rtol=2e-3)


def test_engines_refused_after_tampering(built_package, tmp_path):
    import json

    from llava_edge.package import load_manifest
    from llava_edge.runtime.trt_backend import EngineMismatchError, TrtBackend

    pkg = tmp_path / "pkg"
    shutil.copytree(built_package, pkg)
    rec_path = pkg / "engines" / "engines.json"
    rec = json.loads(rec_path.read_text())
    rec["tensorrt_version"] = "10.0.0.1"
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(EngineMismatchError, match="TensorRT 10.0.0.1"):
        TrtBackend(pkg, load_manifest(pkg))


def test_plugin_engines_tokens_match_onnxruntime(trt_gpu, plugin_package, tmp_path):
    """TensorRT >= 10.9: `--plugins auto` builds the plugin-attention decoder (head_dim 32 package) and the
    backend binds it (runtime/kv_plugin.py); greedy tokens of a ragged batch match onnxruntime."""
    from llava_edge.trt.builder import build_engines
    from llava_edge.contract import AOT_MIN, parse_trt_version
    from llava_edge.trt_env import import_tensorrt

    if parse_trt_version(import_tensorrt().__version__) < AOT_MIN:
        pytest.skip("plugin engines need TensorRT >= 10.9 (AOT plugins)")
    pkg = tmp_path / "package"
    shutil.copytree(plugin_package, pkg)
    result = build_engines(pkg, target="auto", max_batch=2, max_context=128, workspace_gb=0.5)
    assert result.record.attention == "plugin" and result.record.plugins == ["prefill_attention"]
    ort_pipe, trt_pipe = _pipelines(pkg)
    assert trt_pipe.backend.kv.layout == "plugin"
    prompts = ["describe the shape", "what colour is the square on the left ?"]
    a = ort_pipe.generate_batch([None, None], prompts, max_new_tokens=8)
    b = trt_pipe.generate_batch([None, None], prompts, max_new_tokens=8)
    assert [r.token_ids for r in b] == [r.token_ids for r in a]
    graphs = trt_pipe.backend.graphs
    assert graphs.enabled and graphs.captures >= 1, graphs.disabled_reason

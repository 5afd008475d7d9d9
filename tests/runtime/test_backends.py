"""The backend table and opener, and the prefix-reuse capability the pipeline reads from the protocol."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from llava_edge.errors import LlavaEdgeError
from llava_edge.package import load_manifest
from llava_edge.errors import UsageError
from llava_edge.runtime.backend import BackendError, SlotBackend, SupportsPrefixReuse, supports_prefix_reuse
from llava_edge.runtime.backends import ALIASES, BACKENDS, DeviceError, open_backend, resolve
from llava_edge.runtime.fast_backend import FastOrtBackend
from llava_edge.runtime.ort_backend import OrtBackend
from llava_edge.runtime.pipeline import Pipeline
from llava_edge.runtime.trt_backend import TrtBackend


def test_table_names_and_aliases():
    assert list(BACKENDS) == ["ort", "ort-fast", "ort-fast-int4", "ort-fast-ov", "ort-fast-int4-ov", "tensorrt"]
    assert resolve("ort", "cuda") == ("ort", "cuda") and resolve("ort-cpu", "cuda") == ("ort", "cpu")
    assert all(resolve(alias) == target for alias, target in ALIASES.items())
    with pytest.raises(BackendError, match="unknown backend 'ort-magic'; use ort, ort-fast, ort-fast-int4, "
                                           "ort-fast-ov, ort-fast-int4-ov, tensorrt"):
        resolve("ort-magic")


def test_devices_in_the_table_are_enforced():
    assert resolve("ort-fast") == ("ort-fast", "cpu") and resolve("tensorrt") == ("tensorrt", "cuda")
    assert [n for n, s in BACKENDS.items() if "cuda" in s.devices] == ["ort", "tensorrt"]
    with pytest.raises(DeviceError, match=r"^backend ort-fast runs on cpu, not 'cuda' \(on cuda: ort, tensorrt\)$"):
        resolve("ort-fast", "cuda")
    with pytest.raises(UsageError, match="backend tensorrt runs on cuda, not 'cpu'"):
        resolve("tensorrt", "cpu")


def test_slot_capability_is_a_runtime_checkable_protocol():
    assert issubclass(FastOrtBackend, SlotBackend)
    assert not issubclass(OrtBackend, SlotBackend) and not issubclass(TrtBackend, SlotBackend)


def test_open_backend_picks_the_engine_and_decoder(tiny_models, tmp_path):
    from llava_edge.export.fast_decoder import export_fast_decoder

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_models["llava-hf-gqa"]["package"], pkg)
    export_fast_decoder(tiny_models["llava-hf-gqa"]["model"], pkg)
    m = load_manifest(pkg)
    assert isinstance(open_backend("ort", pkg, m, threads=1), OrtBackend)
    assert isinstance(open_backend("ort-cpu", pkg, m, threads=1), OrtBackend)
    fast = open_backend("ort-fast", pkg, m, threads=1)
    assert isinstance(fast, FastOrtBackend) and fast.decoder_graph == "decoder_fast"
    with pytest.raises(LlavaEdgeError):  # no decoder_fast_int4 graph in this package
        open_backend("ort-fast-int4", pkg, m, threads=1)
    with pytest.raises(BackendError, match="unknown backend"):
        Pipeline.from_package(pkg, backend="onnx")
    # the embed graph gets one thread whatever the decoder gets (a second spinning pool slows decode)
    for name in ("ort", "ort-fast"):
        be = open_backend(name, pkg, m, threads=2)
        assert be.decoder.get_session_options().intra_op_num_threads == 2
        assert be.vision.get_session_options().intra_op_num_threads == 2
        assert be.embedder.get_session_options().intra_op_num_threads == 1


def test_prefix_reuse_is_a_declared_capability():
    assert OrtBackend.supports_prefix_reuse and FastOrtBackend.supports_prefix_reuse
    assert not TrtBackend.supports_prefix_reuse  # one device cache: no snapshot/resume
    assert issubclass(OrtBackend, SupportsPrefixReuse) and issubclass(FastOrtBackend, SupportsPrefixReuse)


class _NoReuse:
    """An onnxruntime backend that declares no prefix reuse; snapshot/resume must then never be called."""

    supports_prefix_reuse = False

    def __init__(self, inner: OrtBackend):
        self.inner, self.name, self.float_dtype = inner, inner.name, inner.float_dtype
        self.encode_images, self.embed = inner.encode_images, inner.embed
        self.new_cache, self.step = inner.new_cache, inner.step

    def snapshot(self, cache):  # present but undeclared: a hasattr check would call it
        raise AssertionError("snapshot called on a backend without prefix reuse")

    def resume(self, state, prefix_len, max_len):
        raise AssertionError("resume called on a backend without prefix reuse")


def test_pipeline_reuses_prefixes_only_where_declared(tiny_models):
    pkg = tiny_models["llava-hf-v1.5"]["package"]
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    reuse = Pipeline.from_package(pkg, threads=1)
    plain = Pipeline(pkg, reuse.manifest, _NoReuse(reuse.backend), reuse.tokenizer)
    assert not supports_prefix_reuse(plain.backend) and supports_prefix_reuse(reuse.backend)
    tokens = {}
    for name, pipe in (("reuse", reuse), ("plain", plain)):
        a = pipe.generate(img, "what is it?", max_new_tokens=4)
        b = pipe.generate(img, "what is it?", max_new_tokens=4, history=[("what is it?", a.text)])
        tokens[name] = (a.token_ids, b.token_ids)
    assert reuse.prefix_cache.hits == 1 and plain.prefix_cache.hits == 0
    assert tokens["reuse"] == tokens["plain"]  # reuse never changes a greedy token

"""Fusing q/k/v and gate/up into one MatMulNBits each does not change numerics: each part is quantized on
its own rows, and int8 activations are quantized along K, which the parts share. The fused and unfused
int4 graphs give the same logits, prefill and decode."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from llava_edge.export.fast_decoder import export_fast_decoder
from llava_edge.package import load_manifest
from llava_edge.runtime.fast_backend import FastOrtBackend


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_fused_and_unfused_int4_graphs_give_the_same_logits(tiny_models, tmp_path, accuracy_level):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_models["llava-hf-gqa"]["package"], pkg)
    model = tiny_models["llava-hf-gqa"]["model"]
    for name, fuse in (("fused", True), ("unfused", False)):
        export_fast_decoder(model, pkg, quant="int4-rtn", name=name, fuse=fuse, block_size=32,
                            accuracy_level=accuracy_level)
    manifest = load_manifest(pkg)
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((2, 7, manifest.text.hidden_size)).astype(np.float32)]
    steps += [rng.standard_normal((2, 1, manifest.text.hidden_size)).astype(np.float32) for _ in range(3)]
    logits = {}
    for name in ("fused", "unfused"):
        backend = FastOrtBackend(pkg, manifest, threads=1, decoder=name)
        cache, out, length = backend.new_cache(2, 16), [], 0
        for x in steps:
            length += x.shape[1]
            mask = np.ones((2, length), np.int64)
            positions = np.tile(np.arange(length - x.shape[1], length), (2, 1))
            out.append(backend.step(cache, x, mask, positions).copy())
        logits[name] = np.stack(out)
    assert np.abs(logits["fused"]).max() > 0.1  # the graphs ran on something
    # bitwise equal here; 1e-6 leaves room for other kernels' thread partitioning
    np.testing.assert_allclose(logits["fused"], logits["unfused"], rtol=0, atol=1e-6)

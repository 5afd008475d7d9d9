"""The fast decoder (GroupQueryAttention, in-place KV): same greedy tokens as the portable path and
transformers, ragged batches included, and the cache really is written in place."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from llava_edge.export.fast_decoder import export_fast_decoder, quantize_int4_rtn
from llava_edge.export.verify import hf_greedy_tokens
from llava_edge.package import load_manifest
from llava_edge.runtime.fast_backend import FastOrtBackend
from llava_edge.runtime.pipeline import Pipeline

PRESETS = ["llava-hf-v1.5", "llava-hf-gqa", "original-v1"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def fast_packages(tiny_models, tmp_path_factory):
    """A copy of each tiny package with decoder_fast and decoder_fast_int4 added."""
    out = {}
    for preset in PRESETS:
        pkg = tmp_path_factory.mktemp("fast") / preset
        shutil.copytree(tiny_models[preset]["package"], pkg)
        export_fast_decoder(tiny_models[preset]["model"], pkg)
        export_fast_decoder(tiny_models[preset]["model"], pkg, quant="int4-rtn", block_size=32)
        out[preset] = pkg
    return out


def _pipes(pkg, decoder="decoder_fast"):
    from tokenizers import Tokenizer

    m = load_manifest(pkg)
    tok = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    return (Pipeline.from_package(pkg, backend="ort"),
            Pipeline(pkg, m, FastOrtBackend(pkg, m, threads=2, decoder=decoder), tok))


def _hf_greedy(model, pipe, images, questions):
    return hf_greedy_tokens(model, pipe, images, questions, NEW_TOKENS)


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_greedy_matches_portable_and_transformers(tiny_models, fast_packages, images, preset):
    portable, fast = _pipes(fast_packages[preset])
    q = "What is in the picture?"
    ours = fast.generate(images["landscape"], q, max_new_tokens=NEW_TOKENS).token_ids
    assert len(ours) == NEW_TOKENS
    assert ours == portable.generate(images["landscape"], q, max_new_tokens=NEW_TOKENS).token_ids
    assert ours == _hf_greedy(tiny_models[preset]["model"], fast, [images["landscape"]], [q])[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_ragged_batch_matches(tiny_models, fast_packages, images, preset):
    portable, fast = _pipes(fast_packages[preset])
    imgs = [images["portrait"], images["rgba"], images["tiny"]]
    qs = ["Describe it.", "Where is the small red circle, on the left or on the right of the image?", "Count."]
    ours = [r.token_ids for r in fast.generate_batch(imgs, qs, max_new_tokens=NEW_TOKENS)]
    assert ours == [r.token_ids for r in portable.generate_batch(imgs, qs, max_new_tokens=NEW_TOKENS)]
    assert ours == _hf_greedy(tiny_models[preset]["model"], fast, imgs, qs)


def test_cache_is_written_in_place(fast_packages):
    pkg = fast_packages["llava-hf-gqa"]
    m = load_manifest(pkg)
    be = FastOrtBackend(pkg, m, threads=1)
    cache = be.new_cache(2, 16)
    buffers = [k.ctypes.data for k in cache.keys]
    ids = np.array([[3, 5, 6, 7], [5, 6, 7, 8]], dtype=np.int64)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=np.int64)
    be.step(cache, be.embed(ids), mask, np.maximum(mask.cumsum(1) - 1, 0))
    assert cache.lengths.tolist() == [3, 4]
    # the first row's 3 real tokens were stored from position 0, nothing beyond each row's length
    assert np.abs(cache.keys[0][0, :, :3]).sum() > 0 and np.abs(cache.keys[0][0, :, 3:]).sum() == 0
    assert np.abs(cache.keys[0][1, :, 4:]).sum() == 0
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    be.step(cache, be.embed(np.array([[9], [9]])), mask, np.array([[3], [4]]))
    assert cache.lengths.tolist() == [4, 5]
    assert [k.ctypes.data for k in cache.keys] == buffers  # same memory: written in place
    assert np.abs(cache.keys[0][0, :, 3]).sum() > 0
    # the graph takes position_ids: a position other than the cache fill is a pruned prompt's, not an error
    # (a graph without them refuses it: tests/runtime/test_prune_positions.py)
    assert be.takes_positions
    be.step(cache, be.embed(np.array([[9], [9]])), np.ones((2, 6), np.int64), np.array([[20], [30]]))
    assert cache.lengths.tolist() == [5, 6]


def test_int4_graph_uses_matmulnbits_and_runs(fast_packages, images):
    pkg = fast_packages["llava-hf-v1.5"]
    ops = {n.op_type for n in onnx.load(str(pkg / "decoder_fast_int4.onnx"), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops
    _, fast = _pipes(pkg, "decoder_fast_int4")
    out = fast.generate(images["landscape"], "What is in the picture?", max_new_tokens=8)
    assert len(out.token_ids) >= 1 and all(0 <= t < fast.manifest.text.vocab_size for t in out.token_ids)


def test_int4_rtn_round_trips():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    packed, scales = quantize_int4_rtn(w, 32)
    assert packed.shape == (8, 2, 16) and scales.shape == (16,)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(8, 2, 32).astype(np.float32) - 8
    deq = (q * scales.reshape(8, 2, 1)).reshape(8, 64).T
    assert np.abs(deq - w).max() <= scales.max() / 2 + 1e-6


@pytest.mark.parametrize("quant", [None, "int4-rtn"])
def test_fused_projections_compute_what_the_separate_ones_do(tiny_models, fast_packages, images, quant):
    """q/k/v (GroupQueryAttention's packed input) and gate/up fused into one weight each: the same
    function as one MatMul per projection (each part quantized on its own rows), greedy tokens equal and
    logits within float reassociation; and the fused graph really has one weight per pair."""
    preset = "llava-hf-gqa"
    pkg = fast_packages[preset]
    name = "decoder_fast_int4" if quant else "decoder_fast"
    export_fast_decoder(tiny_models[preset]["model"], pkg, quant=quant, block_size=32, name=name + "_sep", fuse=False)
    nodes = {g: onnx.load(str(pkg / f"{g}.onnx"), load_external_data=False).graph.node for g in (name, name + "_sep")}
    weights = {g: sorted(i for n in ns for i in n.input if i.startswith("layers.0.") and "norm" not in i)
               for g, ns in nodes.items()}
    suffix = ".qweight" if quant else ".weight_t"
    assert [w.removeprefix("layers.0.") for w in weights[name] if w.endswith(suffix)] == \
        [f"{p}{suffix}" for p in ("mlp.down_proj", "mlp.gate_up_proj", "o_proj", "qkv_proj")]
    assert len([w for w in weights[name + "_sep"] if w.endswith(suffix)]) == 7
    assert sum(n.op_type == "QuickGelu" for n in nodes[name]) == load_manifest(pkg).text.num_layers

    m = load_manifest(pkg)
    fused, sep = (FastOrtBackend(pkg, m, threads=1, decoder=g) for g in (name, name + "_sep"))
    emb = np.random.default_rng(0).standard_normal((1, 9, m.text.hidden_size)).astype(np.float32)
    logits = []
    for be in (fused, sep):
        cache = be.new_cache(1, 16)
        rows = [be.step(cache, emb[:, :7], np.ones((1, 7), np.int64), np.arange(7)[None])[0]]
        rows += [be.step(cache, emb[:, i:i + 1], np.ones((1, i + 1), np.int64), np.array([[i]]))[0] for i in (7, 8)]
        logits.append(np.stack(rows))
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4)
    tok = __import__("tokenizers").Tokenizer.from_file(str(pkg / "tokenizer.json"))
    q = "What is in the picture?"
    outs = [Pipeline(pkg, m, be, tok).generate(images["portrait"], q, max_new_tokens=12).token_ids
            for be in (fused, sep)]
    assert outs[0] == outs[1]

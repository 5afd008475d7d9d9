"""The plugin-attention decoder graph (trt/plugin_decoder.py) computes what the portable graph does.

The graph is run by ``onnx.reference.ReferenceEvaluator`` with the plugin nodes executed by our Triton
kernels (TRITON_INTERPRET=1 on CPU, set by conftest) or their torch references
(kernels/onnx_eval.py), and compared with the portable decoder.onnx in onnxruntime: logits of every
real token, the cache rows, and greedy tokens over several decode steps, for a ragged batch (the
portable graph gets it left-padded with a mask, the plugin graph right-padded with lengths) on a GQA
(4 heads / 2 kv heads, head_dim 32) model. Unwritten cache slots are NaN, so a read past a row's
length or a missing write shows up as NaN logits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llava_edge.trt.plugin_decoder import (
    PluginDecoderConfig, PluginDecoderError, make_plugin_decoder, plugin_decoder_io_names,
)
from llava_edge.kernels.onnx_eval import PluginGraphRunner
from llava_edge.trt.plugins import ONNX_DOMAIN, PLUGIN_IO, PLUGIN_NAMESPACE
from llava_edge.package import load_manifest

MAX_CTX = 32
TOL = 1e-4  # fp32; measured ~3e-6
LENS = [6, 3]  # ragged prompt lengths
STEPS = 4  # greedy decode steps after the prompt


@pytest.fixture(scope="module")
def setup(plugin_package):
    m = load_manifest(plugin_package)
    t = m.text
    portable = onnx.load(str(plugin_package / m.graphs["decoder"].file))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(portable.SerializeToString(), so, providers=["CPUExecutionProvider"])
    embed = ort.InferenceSession(str(plugin_package / m.graphs["embed"].file), so, providers=["CPUExecutionProvider"])
    cfg = dict(max_positions=t.max_context, block_m=16, block_n=16)
    graphs = {kind: make_plugin_decoder(portable, t.num_heads, t.num_kv_heads, t.head_dim,
                                        PluginDecoderConfig(kind=kind, num_splits=2, **cfg))
              for kind in ("prefill", "decode")}
    return m, sess, embed, graphs


def _portable_run(m, sess, embed, prompts):
    """Left-padded batch through the portable graph: prompt logits of real tokens per row, greedy tokens."""
    t, b, width = m.text, len(prompts), max(len(p) for p in prompts)
    ids = np.full((b, width), 0, np.int64)
    mask = np.zeros((b, width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    past = [np.zeros((b, t.num_kv_heads, 0, t.head_dim), np.float32) for _ in range(2 * t.num_layers)]
    names = [i.name for i in sess.get_inputs()]
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    out = sess.run(None, dict(zip(names, [embed.run(None, {"input_ids": ids})[0], mask, pos, *past])))
    prompt_logits = [out[0][r, width - len(p):] for r, p in enumerate(prompts)]
    step_logits, tokens = [], []
    nxt = out[0][:, -1].argmax(-1)
    for _ in range(STEPS):
        tokens.append(nxt)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        pos = mask.sum(1, keepdims=True) - 1
        e = embed.run(None, {"input_ids": nxt[:, None].astype(np.int64)})[0]
        out = sess.run(None, dict(zip(names, [e, mask, pos, *out[1:]])))
        step_logits.append(out[0][:, 0])
        nxt = out[0][:, -1].argmax(-1)
    presents = out[1:]
    return prompt_logits, step_logits, np.stack(tokens, 1), presents, mask


def _plugin_run(m, embed, graphs, prompts, impl, decode_kind):
    """Right-padded batch through the plugin graph(s), one cache buffer per layer k/v fed every call."""
    t, b, width = m.text, len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    caches = {n: np.full((b, t.num_kv_heads, MAX_CTX, t.head_dim), np.nan, np.float32)
              for n in plugin_decoder_io_names(t.num_layers)[0][3:]}
    ids_before = {n: id(a) for n, a in caches.items()}
    prefill = PluginGraphRunner(graphs["prefill"], impl)
    out = prefill.run({"inputs_embeds": embed.run(None, {"input_ids": ids})[0], "prompt_lens": lens,
                       "start_pos": np.zeros(b, np.int32), **caches})
    for n, a in caches.items():  # aliased outputs are the fed buffers, updated in place
        assert out[n.replace("past_key_values", "present")] is a
    prompt_logits = [out["logits"][r, : len(p)] for r, p in enumerate(prompts)]
    step = PluginGraphRunner(graphs[decode_kind], impl)
    scratch = {"decode.partial_o": np.full((b, t.num_heads, 2, t.head_dim), np.nan, np.float32),
               "decode.partial_ml": np.full((b, t.num_heads, 2, 2), np.nan, np.float32),
               "decode.counters": np.zeros((b, t.num_kv_heads), np.int32)}
    step_logits, tokens = [], []
    nxt = out["logits"][np.arange(b), lens - 1].argmax(-1)
    for _ in range(STEPS):
        tokens.append(nxt)
        e = embed.run(None, {"input_ids": nxt[:, None].astype(np.int64)})[0]
        if decode_kind == "decode":
            feeds = {"inputs_embeds": e, "seq_lens": lens, **caches, **scratch}
        else:  # a decode step as a one-token prompt appended at start_pos = length
            feeds = {"inputs_embeds": e, "prompt_lens": np.ones(b, np.int32), "start_pos": lens, **caches}
        out = step.run(feeds)
        step_logits.append(out["logits"][:, 0])
        nxt = out["logits"][:, 0].argmax(-1)
        lens = lens + 1
    if decode_kind == "decode":
        assert not scratch["decode.counters"].any(), "split-K counters must return to 0"
    assert {n: id(a) for n, a in caches.items()} == ids_before
    return prompt_logits, step_logits, np.stack(tokens, 1), caches, lens


@pytest.mark.parametrize("impl,decode_kind", [("triton", "decode"), ("triton", "prefill"), ("reference", "decode")])
def test_plugin_graph_matches_portable(setup, impl, decode_kind):
    m, sess, embed, graphs = setup
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 300, n).tolist() for n in LENS]
    p_prompt, p_steps, p_tokens, presents, mask = _portable_run(m, sess, embed, prompts)
    g_prompt, g_steps, g_tokens, caches, lens = _plugin_run(m, embed, graphs, prompts, impl, decode_kind)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(p_prompt + p_steps, g_prompt + g_steps))
    assert worst < TOL, f"max |plugin - portable| logits {worst:.2e}"
    np.testing.assert_array_equal(g_tokens, p_tokens)
    # cache rows: the portable present (left-padded) vs the plugin cache (right-padded, from slot 0)
    width = mask.shape[1]
    for j, (name, cache) in enumerate(caches.items()):
        for r in range(len(prompts)):
            n = int(lens[r])
            np.testing.assert_allclose(cache[r, :, :n], presents[j][r, :, width - n:], atol=TOL, rtol=0)
            assert np.isnan(cache[r, :, n:]).all(), f"{name} row {r}: a slot past the row's length was written"


def test_graph_form(setup):
    m, _, _, graphs = setup
    t = m.text
    for kind, g in graphs.items():
        onnx.checker.check_model(g)
        plugins = [n for n in g.graph.node if n.domain == ONNX_DOMAIN]
        assert len(plugins) == t.num_layers
        op = f"{kind}_attention"
        for i, n in enumerate(plugins):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert n.op_type == op and attrs["plugin_namespace"].decode() == PLUGIN_NAMESPACE and attrs["aot"] == 1
            assert len(n.input) == len(PLUGIN_IO[op][0]) and len(n.output) == len(PLUGIN_IO[op][1])
            cache_in = PLUGIN_IO[op][0].index("k_cache")
            assert n.input[cache_in] == f"past_key_values.{i}.key" and n.output[1] == f"present.{i}.key"
        ops = {n.op_type for n in g.graph.node}
        assert not ops & {"Softmax", "Concat", "Tile", "Cos", "Sin"}, "the standard attention must be gone"
        names_in, names_out = plugin_decoder_io_names(t.num_layers, kind)
        assert [i.name for i in g.graph.input] == names_in and [o.name for o in g.graph.output] == names_out


def test_refuses_what_the_kernels_cannot_take(setup):
    """head_dim 16 (the other tiny presets) is below the kernels' minimum; a graph that is not the portable
    layout is refused: clear errors, not a bad graph."""
    m, sess, _, graphs = setup
    with pytest.raises(PluginDecoderError, match="head_dim 16"):
        make_plugin_decoder(graphs["prefill"], 4, 2, 16)
    with pytest.raises(PluginDecoderError, match="past_key_values"):
        make_plugin_decoder(graphs["prefill"].__class__(), 4, 2, 32)

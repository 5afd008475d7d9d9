"""The static-cache decoder graph (trt/static_decoder.py): same numbers as the portable graph and
as the torch decoder, the I/O the TensorRT backend binds, and TensorRT's op check."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llava_edge.trt import ops as trt_ops
from llava_edge.trt.static_decoder import (
    StaticDecoderError, make_static_decoder, static_decoder_io_names, write_static_decoder,
)
from llava_edge.package import load_manifest

MAX_CTX = 16


@pytest.fixture(scope="module")
def graphs(trt_package, tmp_path_factory):
    """(manifest, portable session, static session, static model), the static graph derived next to a
    copy of the decoder (it shares the decoder's directory by design)."""
    d = tmp_path_factory.mktemp("static")
    m = load_manifest(trt_package)
    shutil.copy(trt_package / m.graphs["decoder"].file, d / "decoder.onnx")
    write_static_decoder(d / "decoder.onnx", d / "decoder_static.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    portable = ort.InferenceSession(str(d / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    static = ort.InferenceSession(str(d / "decoder_static.onnx"), so, providers=["CPUExecutionProvider"])
    return m, portable, static, onnx.load(str(d / "decoder_static.onnx"))


def _run_both(m, portable, static, steps, garbage: float):
    """Feed the same steps through the portable graph (growing past) and the static graph (a fixed
    MAX_CTX buffer filled from its new.* outputs, unfilled slots holding ``garbage``). Row 0 is left-padded
    by 3. Returns per step (portable outputs, static outputs, real-token mask of the step)."""
    t, rng, b = m.text, np.random.default_rng(0), 2
    n_kv = 2 * t.num_layers
    cache = [np.full((b, t.num_kv_heads, MAX_CTX, t.head_dim), garbage, np.float32) for _ in range(n_kv)]
    past = [np.zeros((b, t.num_kv_heads, 0, t.head_dim), np.float32) for _ in range(n_kv)]
    mask_all = np.ones((b, MAX_CTX), np.int64)
    mask_all[0, :3] = 0
    names_in = [i.name for i in portable.get_inputs()]
    length, out = 0, []
    for n in steps:
        e = rng.standard_normal((b, n, t.hidden_size)).astype(np.float32)
        pos = np.tile(np.arange(length, length + n), (b, 1))
        pm = mask_all[:, : length + n]
        po = portable.run(None, dict(zip(names_in, [e, pm, pos, *past])))
        sm = np.concatenate([pm[:, :length], np.zeros((b, MAX_CTX - length), np.int64), pm[:, length:]], axis=1)
        so = static.run(None, dict(zip(names_in, [e, sm, pos, *cache])))
        for j in range(n_kv):
            cache[j][:, :, length : length + n] = so[1 + j]
        out.append((po, so, pm[:, length:].astype(bool)))
        past, length = po[1:], length + n
    return out


@pytest.mark.parametrize("garbage", [0.0, 123.0])
def test_static_graph_matches_portable(graphs, garbage):
    m, portable, static, _ = graphs
    worst = 0.0
    for po, so, real in _run_both(m, portable, static, [5, 1, 3, 1, 1], garbage):
        # real tokens only: a padding query attends to nothing real and its output is never read
        worst = max(worst, float(np.abs(po[0] - so[0])[real].max()))
        length = po[1].shape[2] - so[1].shape[2]
        for pres, new in zip(po[1:], so[1:]):
            new_t, pres_t = new.transpose(0, 2, 1, 3), pres[:, :, length:].transpose(0, 2, 1, 3)
            np.testing.assert_allclose(new_t[real], pres_t[real], atol=1e-5)
    assert worst < 1e-5, worst


def test_static_graph_matches_torch_decoder(graphs, trt_package):
    """Prefill then one decode step, against graphs.Decoder in torch with the growing past."""
    import torch

    from llava_edge.export.checkpoint import load_checkpoint
    from llava_edge.export.graphs import Decoder

    m, _, static, _ = graphs
    t = m.text
    dec = Decoder(load_checkpoint(trt_package.parent / "checkpoint").model).eval()
    rng = np.random.default_rng(3)
    e1 = rng.standard_normal((1, 4, t.hidden_size)).astype(np.float32)
    e2 = rng.standard_normal((1, 1, t.hidden_size)).astype(np.float32)
    empty = [torch.zeros(1, t.num_kv_heads, 0, t.head_dim) for _ in range(2 * t.num_layers)]
    with torch.no_grad():
        ref1 = dec(torch.from_numpy(e1), torch.ones(1, 4, dtype=torch.int64), torch.arange(4)[None], *empty)
        ref2 = dec(torch.from_numpy(e2), torch.ones(1, 5, dtype=torch.int64), torch.tensor([[4]]), *ref1[1:])
    names = [i.name for i in static.get_inputs()]
    cache = [np.zeros((1, t.num_kv_heads, MAX_CTX, t.head_dim), np.float32) for _ in range(2 * t.num_layers)]
    mask1 = np.concatenate([np.zeros((1, MAX_CTX), np.int64), np.ones((1, 4), np.int64)], 1)
    s1 = static.run(None, dict(zip(names, [e1, mask1, np.arange(4)[None], *cache])))
    for c, n in zip(cache, s1[1:]):
        c[:, :, :4] = n
    mask2 = np.zeros((1, MAX_CTX + 1), np.int64)
    mask2[0, :4] = mask2[0, -1] = 1
    s2 = static.run(None, dict(zip(names, [e2, mask2, np.array([[4]]), *cache])))
    assert np.abs(s1[0] - ref1[0].numpy()).max() < 1e-5
    assert np.abs(s2[0] - ref2[0].numpy()).max() < 1e-5
    np.testing.assert_allclose(s2[1], ref2[1][:, :, 4:].numpy(), atol=1e-5)  # layer 0 key: new token, rotary applied


def test_static_graph_io_and_refusals(graphs, trt_package):
    m, _, static, model = graphs
    names_in, names_out = static_decoder_io_names(m.text.num_layers)
    assert [i.name for i in static.get_inputs()] == names_in
    assert [o.name for o in static.get_outputs()] == names_out
    assert [str(d) for d in static.get_outputs()[1].shape] == ["batch", str(m.text.num_kv_heads), "seq",
                                                                str(m.text.head_dim)]
    with pytest.raises(StaticDecoderError, match="no present"):
        make_static_decoder(model)  # already static
    with pytest.raises(StaticDecoderError, match="next to"):
        write_static_decoder(trt_package / "decoder.onnx", trt_package.parent / "elsewhere.onnx")


@pytest.mark.parametrize("version", [(10, 3), (10, 15), (11, 0)])
def test_static_graph_passes_trt_op_check(graphs, version):
    _, _, _, model = graphs
    check = trt_ops.check_model(model, "decoder", version)
    assert check.ok, check.describe()
    assert "Concat" in check.op_counts and not check.plugins
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17

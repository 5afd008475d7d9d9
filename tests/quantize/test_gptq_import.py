import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from llava_edge.quantize.gptq_import import (GPTQImportError, import_gptq_checkpoint, pack_int32, to_autogptq,
                                                unpack_int32)
from llava_edge.quantize.rtn import rtn_quantize

K, N, G = 64, 48, 32


def test_int32_layout_lowest_bits_first():
    words = pack_int32(np.arange(1, 9).reshape(8, 1), 4, axis=0)
    assert words.view(np.uint32)[0, 0] == 0x87654321
    r = np.random.default_rng(0).integers(0, 16, (16, 24))
    assert np.array_equal(unpack_int32(pack_int32(r, 4, axis=1), 4, axis=1), r)


def _write(path, tensors, **qc):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": G, "sym": True, **qc}))


def _desc_act_linear(seed, n=N, k=K):
    """AutoGPTQ desc_act tensors built directly: unsigned codes [K, N], a g_idx giving each group
    G scattered channels, and the float weight they mean (computed independently here)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (k, n)).astype(np.int32)
    order = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // G
    scales = (rng.random((k // G, n)) + 0.5).astype(np.float16)
    w = (codes - 8).astype(np.float32) * scales.astype(np.float32)[g_idx, :]  # [K, N]
    zeros = np.full((k // G, n), 7, np.int32)  # v1 stores zero - 1
    t = {"qweight": pack_int32(codes, 4, 0), "qzeros": pack_int32(zeros, 4, 1), "scales": scales, "g_idx": g_idx}
    return t, torch.from_numpy(w.T.copy())


def test_import_v1_round_trip_is_exact(tmp_path):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    ref = rtn_quantize(w, 4, G, scale_dtype=torch.float16)  # AutoGPTQ stores fp16 scales
    t = {f"model.language_model.layers.0.self_attn.q_proj.{k}": v for k, v in to_autogptq(ref).items()}
    _write(tmp_path / "ck", t, desc_act=False)
    imp = import_gptq_checkpoint(tmp_path / "ck")
    q = imp.quantized["layers.0.q_proj"]
    assert q.perm is None and torch.equal(q.q, ref.q) and torch.equal(q.dequantize(), ref.dequantize())


def test_v2_zero_points_read_as_v1_are_refused(tmp_path):
    ref = rtn_quantize(torch.randn(N, K), 4, G, scale_dtype=torch.float16)
    t = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in to_autogptq(ref, v1=False).items()}
    _write(tmp_path / "v2", t)
    with pytest.raises(GPTQImportError, match="asymmetric"):
        import_gptq_checkpoint(tmp_path / "v2")
    _write(tmp_path / "v2ok", t, checkpoint_format="gptq_v2")
    assert torch.equal(import_gptq_checkpoint(tmp_path / "v2ok").quantized["layers.0.mlp.up_proj"].q, ref.q)


def test_asymmetric_config_is_refused_with_a_reason(tmp_path):
    ref = rtn_quantize(torch.randn(N, K), 4, G, scale_dtype=torch.float16)
    _write(tmp_path / "a", {f"model.layers.0.mlp.up_proj.{k}": v for k, v in to_autogptq(ref).items()}, sym=False)
    with pytest.raises(GPTQImportError, match="re-quantize"):
        import_gptq_checkpoint(tmp_path / "a")


def test_desc_act_g_idx_is_handled_by_permuting(tmp_path):
    inter = 128
    tensors, weights = {}, {}
    for name, (n, k) in {"self_attn.q_proj": (N, K), "mlp.gate_proj": (inter, K), "mlp.up_proj": (inter, K),
                         "mlp.down_proj": (K, inter)}.items():
        t, w = _desc_act_linear(len(tensors), n, k)
        tensors.update({f"model.layers.0.{name}.{p}": v for p, v in t.items()})
        weights[name] = w
    _write(tmp_path / "da", tensors, desc_act=True)
    imp = import_gptq_checkpoint(tmp_path / "da")
    q = imp.quantized["layers.0.q_proj"]
    assert q.perm is not None  # needs a Gather on the activation
    torch.testing.assert_close(q.dequantize_original_order(), weights["self_attn.q_proj"], rtol=0, atol=0)
    # down_proj's permutation was folded into gate/up rows: the MLP computes the same function
    assert imp.quantized["layers.0.mlp.down_proj"].perm is None and imp.notes
    x = torch.randn(5, K)

    def mlp(gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    got = mlp(*(imp.quantized[f"layers.0.mlp.{p}"].dequantize_original_order()
                for p in ("gate_proj", "up_proj", "down_proj")))
    ref = mlp(weights["mlp.gate_proj"], weights["mlp.up_proj"], weights["mlp.down_proj"])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))  # summation order only


def test_g_idx_with_uneven_groups_is_refused(tmp_path):
    t, _ = _desc_act_linear(0)
    t["g_idx"] = np.zeros(K, np.int32)
    _write(tmp_path / "bad", {f"model.layers.0.self_attn.o_proj.{k}": v for k, v in t.items()}, desc_act=True)
    with pytest.raises(GPTQImportError, match="contiguous"):
        import_gptq_checkpoint(tmp_path / "bad")

"""The per-channel int4 twin (group = K): its MatMul weights are per-output-channel RTN int4 values times
their scales, computed here independently, and differ from the block twin's where K holds several blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from llava_edge.export.factory import TinySpec, build_checkpoint
from llava_edge.export.fast_decoder import (INT4_DEQUANTIZED, INT4_PER_CHANNEL_DEQUANTIZED, FastDecoderConfig,
                                            build_fast_decoder)


def _per_channel_rtn(w: np.ndarray) -> np.ndarray:
    """torch [out, in] -> the [in, out] weight of symmetric int4 RTN with one scale per output row."""
    scale = np.abs(w).max(axis=1, keepdims=True) / 7
    return (np.clip(np.rint(w / scale), -8, 7) * scale).T


def _weights(path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path), load_external_data=True)
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # intermediate 96: down_proj's K is no power of two (as the shipped model's 384), 3 blocks of 32
    model, _ = build_checkpoint(tmp_path_factory.mktemp("pc") / "ck",
                                TinySpec(kv_heads=2, heads=4, intermediate=96, pad_to_square=False, seed=5))
    return model


def test_per_channel_twin_holds_per_channel_rtn_weights(model, tmp_path):
    build_fast_decoder(model, tmp_path / "pc.onnx", FastDecoderConfig(quant=INT4_PER_CHANNEL_DEQUANTIZED))
    build_fast_decoder(model, tmp_path / "block.onnx", FastDecoderConfig(quant=INT4_DEQUANTIZED))
    pc, block = _weights(tmp_path / "pc.onnx"), _weights(tmp_path / "block.onnx")
    for i, layer in enumerate(model.model.language_model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        want = {
            f"layers.{i}.qkv_proj.weight_t": [attn.q_proj, attn.k_proj, attn.v_proj],
            f"layers.{i}.o_proj.weight_t": [attn.o_proj],
            f"layers.{i}.mlp.gate_up_proj.weight_t": [mlp.gate_proj, mlp.up_proj],
            f"layers.{i}.mlp.down_proj.weight_t": [mlp.down_proj],
        }
        for name, mods in want.items():
            expected = np.concatenate([_per_channel_rtn(m.weight.detach().float().numpy()) for m in mods], axis=1)
            np.testing.assert_allclose(pc[name], expected, rtol=1e-6, atol=0, err_msg=name)
            # at most 16 levels per output column: one scale over the whole of K
            assert max(len(np.unique(col)) for col in pc[name].T) <= 16
        down = f"layers.{i}.mlp.down_proj.weight_t"
        assert not np.allclose(pc[down], block[down]), "per-channel twin equals the block-32 twin on K=96"
    # lm_head stays float (as quantize's GPTQ/RTN packages): it is the checkpoint's weight
    np.testing.assert_array_equal(pc["lm_head.weight_t"], model.lm_head.weight.detach().float().numpy().T)

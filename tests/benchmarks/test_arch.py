"""Named architectures: shapes of the real models, and random checkpoints the loader reads."""

from __future__ import annotations

import json

import pytest

from llava_edge.benchmarks.arch import ARCHS, ArchSpec, build_random_checkpoint, get_arch


def test_presets_have_the_real_models_sizes():
    assert abs(ARCHS["llava-1.5-7b"].decoder_params() / 1e9 - 6.74) < 0.05
    assert ARCHS["llava-1.5-7b"].num_image_tokens == 576
    edge = ARCHS["edge-1b"]
    assert abs(edge.decoder_params() / 1e9 - 1.10) < 0.02  # TinyLlama-1.1B
    assert edge.heads // edge.kv_heads == 8  # GQA
    with pytest.raises(ValueError, match="unknown architecture"):
        get_arch("llava-70b")


def test_random_checkpoint_loads_with_the_requested_shape(tmp_path):
    from safetensors import safe_open

    from llava_edge.export.checkpoint import load_checkpoint

    spec = ArchSpec("t", image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                    hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab_size=1000, max_positions=128)
    out = build_random_checkpoint(spec, tmp_path / "ck")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    ck = load_checkpoint(out)
    tc = ck.model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.vocab_size) == (64, 2, 2, 1000)
    assert ck.model.lm_head.weight.shape == (1000, 64)
    assert ck.vision.num_image_tokens == spec.num_image_tokens == 16
    assert json.loads((out / "llava_edge_arch.json").read_text())["arch"]["name"] == "t"

"""int4 for every decoder family: GPTQ through the quantizer (calibrated with the family's own chat
template and, for NeXT, anyres tiles) and RTN in the fast decoder; both packages generate."""

from __future__ import annotations

import onnx
import pytest

from llava_edge.runtime.pipeline import Pipeline

from .test_decoders import NEW_TOKENS, QUESTIONS

PRESETS = ["llava-mistral", "llava-phi3", "llava-interleave", "next-vicuna", "next-mistral"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("preset", PRESETS)
def test_gptq_int4_every_linear(family_models, images, tmp_path, preset):
    from llava_edge.quantize.options import QuantizeOptions
    from llava_edge.quantize.quantize import quantize_package
    from llava_edge.export.fast_decoder import export_fast_decoder

    m = family_models[preset]
    res = quantize_package(m["package"], m["checkpoint"], tmp_path / "gptq",
                           QuantizeOptions(samples=8, holdout=2, group_size=32), progress=False, print_report=False)
    layers = m["spec"].layers
    # Qwen2's biased q/k/v and Phi-3's fused projections (split at load) are quantized like the rest
    assert res.skipped == {}
    assert sorted(res.quantized) == sorted(f"layers.{i}.{n}" for i in range(layers) for n in LINEARS)
    graph = onnx.load(str(tmp_path / "gptq" / "decoder.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in graph.graph.node) == 7 * layers
    assert res.report.logits.top1_agreement > 0.5  # held-out next-token agreement with the float package
    out = Pipeline.from_package(tmp_path / "gptq").generate(images["portrait"], QUESTIONS[0], max_new_tokens=NEW_TOKENS)
    assert out.token_ids and out.finish_reason in ("eos", "length")

    # the fast decoder's RTN int4 graph of the same family runs through the fast backend
    export_fast_decoder(m["model"], tmp_path / "gptq", quant="int4-rtn", block_size=32)
    fast = Pipeline.from_package(tmp_path / "gptq", backend="ort-fast-int4")
    assert len(fast.generate(images["portrait"], QUESTIONS[0], max_new_tokens=8).token_ids) >= 1

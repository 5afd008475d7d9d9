"""The fast decoder builder (export/fast_decoder.DecoderBuilder: one method per block, family hooks) writes
every family's graph byte for byte as the single-loop builder it replaced did, for every option, when asked
for that graph (``positions=False``: rotary by cache index); the default graph (``position_ids`` input,
RotaryEmbedding on q and k) holds the same weights and differs only in its attention wiring.

The pinned digests were computed with that builder (commit 7a68938) on these models. The weights are set
from integers here, not drawn from torch's generator, and the rotary tables' bytes are left out of the
digest (torch's cos/sin may differ in the last bit between CPUs; the tables are checked numerically), so
a digest depends on the builder alone."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from llava_edge.export.factory import build_checkpoint
from llava_edge.export.fast_decoder import (INT4_DEQUANTIZED, INT4_PER_CHANNEL_DEQUANTIZED, BUILDERS, DecoderBuilder,
                                            FastDecoderConfig, Phi3Builder, Qwen2Builder, build_fast_decoder,
                                            builder_for)
from llava_edge.export.graphs import rotary_inv_freq

# Mistral (GQA), Qwen2 (q/k/v bias), Phi-3 (fused qkv / gate_up in the model, longrope), LLaMA MHA and GQA
FAMILIES = ["llava-hf-v1.5", "llava-hf-gqa", "llava-mistral", "llava-qwen2", "llava-phi3"]
OPTIONS = {
    "default": {},
    "unfused": dict(fuse=False),
    "fp16": dict(dtype="float16"),
    "int4": dict(quant="int4-rtn", block_size=32),
    "int4-b64-head8": dict(quant="int4-rtn", block_size=64, lm_head_bits=8),
    "int4-qhead-exact": dict(quant="int4-rtn", block_size=32, quantize_lm_head=True, accuracy_level=0),
    "int4-unfused-fp16": dict(quant="int4-rtn", fuse=False, dtype="float16", block_size=32),
    "twin": dict(quant=INT4_DEQUANTIZED, block_size=32, lm_head_bits=8),
    "per-channel": dict(quant=INT4_PER_CHANNEL_DEQUANTIZED),
    "head8": dict(lm_head_bits=8),
    "head4": dict(lm_head_bits=4),
}
DIGESTS = {  # family/option -> graph_digest, from the single-loop builder
    "llava-hf-v1.5/default": "3179afd7988b7da04bf0d308786df7c6c55ca89c4ae67671fdafef1cab7e0721",
    "llava-hf-v1.5/unfused": "a9d262bddd7f2f5af9bf6a78a05df2d8ec3cdfb175009b54d3dcd9c1f8db5e6a",
    "llava-hf-v1.5/fp16": "9ed69180f61bbee517a0e40be3e14f4f0d7d9e4be595a3065e4d51aecfd2f0f5",
    "llava-hf-v1.5/int4": "5ab66e303defe331fafc3f99f285dff251a83f907fbc8c4847b7ad1d84a82b48",
    "llava-hf-v1.5/int4-b64-head8": "0d694c94c66d316e26c7ecbd6f7d0202252dd44137d95a55f7877b60a20ffcda",
    "llava-hf-v1.5/int4-qhead-exact": "74634bb145f26cb2d1140f712567b4abc8afb011ab1f1fdfa65f0acbdcc67b9c",
    "llava-hf-v1.5/int4-unfused-fp16": "27008d88e6256a0b6a862dafb4aaec63d08adb4176955e2aa9b38a3d3f4fd13b",
    "llava-hf-v1.5/twin": "064169b951443cdbae7cc74513181d2b1114b6026bba92d2958fd7462be4af92",
    "llava-hf-v1.5/per-channel": "1f4d2251ba2e860f2c8d6976ce73c729410b5e5d723b42c2f1333ce00c9f3de2",
    "llava-hf-v1.5/head8": "a36b4c6310a26d79a6326d9ae20c9023efa750b1f57224c01c553e7c419c9ce3",
    "llava-hf-v1.5/head4": "24b9b19592551d48c08684e5c0c0e3bcfc44624dc88a1fb81ba44ff3f514e8bb",
    "llava-hf-gqa/default": "c1cf1427ada23b020c03a2ac189511e8cc067b5d3aabc8caef58cd4898621188",
    "llava-hf-gqa/unfused": "79382dd80d82bdbe8bf7abb08009e1b39f4b97a77db1d2232e4944dc517faba0",
    "llava-hf-gqa/fp16": "2eebd3a1fc94e2aa9a9838a61c4bde629ec6eb2615140ce4da7277a6709de642",
    "llava-hf-gqa/int4": "7a7abdbdc2b69ee3e42004c8396bd37bbe8591782ace97569f718772975c700b",
    "llava-hf-gqa/int4-b64-head8": "0f70babbd06458033d879846ceeb2763fb2e0e84e2e919a3726ed16cbbd30b3b",
    "llava-hf-gqa/int4-qhead-exact": "76a1a646ba17c8852b89d69123ed736f34bb6843baede68e568e934ae375c8bd",
    "llava-hf-gqa/int4-unfused-fp16": "4450735bbaf3a13a9f0bfa2d34981805ea8826051de60601b71fd1814cef1ab4",
    "llava-hf-gqa/twin": "38d59d41de05a30dca3530e6a541363204b1a70ff2c7e59ab2b9d8f54bec23a7",
    "llava-hf-gqa/per-channel": "627fa2589a1e935b48eb95cbeecff205a9c0071ba8eb216f02dee653ca3aeca9",
    "llava-hf-gqa/head8": "cf3a905061f0e31eecf940c29f67666030001e8e484922582090a77b1c822e2b",
    "llava-hf-gqa/head4": "fb7d678184d63c264964b601a75524e27c40c7e6086400caae43fd87b44d7332",
    "llava-mistral/default": "c1cf1427ada23b020c03a2ac189511e8cc067b5d3aabc8caef58cd4898621188",
    "llava-mistral/unfused": "79382dd80d82bdbe8bf7abb08009e1b39f4b97a77db1d2232e4944dc517faba0",
    "llava-mistral/fp16": "2eebd3a1fc94e2aa9a9838a61c4bde629ec6eb2615140ce4da7277a6709de642",
    "llava-mistral/int4": "7a7abdbdc2b69ee3e42004c8396bd37bbe8591782ace97569f718772975c700b",
    "llava-mistral/int4-b64-head8": "0f70babbd06458033d879846ceeb2763fb2e0e84e2e919a3726ed16cbbd30b3b",
    "llava-mistral/int4-qhead-exact": "76a1a646ba17c8852b89d69123ed736f34bb6843baede68e568e934ae375c8bd",
    "llava-mistral/int4-unfused-fp16": "4450735bbaf3a13a9f0bfa2d34981805ea8826051de60601b71fd1814cef1ab4",
    "llava-mistral/twin": "38d59d41de05a30dca3530e6a541363204b1a70ff2c7e59ab2b9d8f54bec23a7",
    "llava-mistral/per-channel": "627fa2589a1e935b48eb95cbeecff205a9c0071ba8eb216f02dee653ca3aeca9",
    "llava-mistral/head8": "cf3a905061f0e31eecf940c29f67666030001e8e484922582090a77b1c822e2b",
    "llava-mistral/head4": "fb7d678184d63c264964b601a75524e27c40c7e6086400caae43fd87b44d7332",
    "llava-qwen2/default": "57c3cc97d296d1ba0652c24fd37b8d59bc68bbe8c565d7ba36ed2446d62dd98e",
    "llava-qwen2/unfused": "664938e024a5c4833e051073b8bcdcec42fd9ede9caacf7b31dbfe8118bb3c3e",
    "llava-qwen2/fp16": "86dab9476d9636e0e3d55349045d4000dbcdb744f157dcebabe8a6fd4b7229e1",
    "llava-qwen2/int4": "324bf621d42a227c216a0cbcca9feeffeacc765fe355fad2005913b5979d5ed8",
    "llava-qwen2/int4-b64-head8": "538e2f6b2d7593a1adc6a674d161c0b29a97c64491599f37331ca16929c2529c",
    "llava-qwen2/int4-qhead-exact": "7cbb2b787e0102794221f7e5cc2d4de726cf7a1b185c3672453c19b4dc840f90",
    "llava-qwen2/int4-unfused-fp16": "85feaa0f0e7bcfc44fd3ec25e9f776a7d6b20594bb4e5eee60ba7e5987da1e5b",
    "llava-qwen2/twin": "8e905c32ab43877cb5aa4e8e2210835534836f9c8aa2b274f38e5a7147831f8a",
    "llava-qwen2/per-channel": "96d62aea06f628855c93801f100e8a63cbcfdbc7412931f139c56ad6b9815c96",
    "llava-qwen2/head8": "fc0589546ec98350971dfb055a9aa8be0b75a1704610061f03976eed46eae306",
    "llava-qwen2/head4": "6b3774d0099769003236138521ac05fc4ceac43fa0fa52e7bd8de5ed004d42d7",
    "llava-phi3/default": "50ead74e5515d9821576e7560927f2f4d932fc3199b4d6857fb952c8df84750d",
    "llava-phi3/unfused": "b406463f16377c74095cd2fb14c04a01745e923935f52dffbe63ff0f123e2493",
    "llava-phi3/fp16": "20927e9b9cd086ed89fbaf4ad28e32273f7342b3bad6dfbc3ade5fe38ceb27ba",
    "llava-phi3/int4": "65504d5ca3795c4075cbfed7ad0a7bfefd0eca208216ef25d81c4aaf9abd5dd7",
    "llava-phi3/int4-b64-head8": "223be4c690c8f35d6d5a1e9ab5bc763c3a9ba65247dbe58b383aeb5ae57017ad",
    "llava-phi3/int4-qhead-exact": "327430be3c3032f39d4c7efd38e23dbf932d6ebf02b92032a572e36450dd8bcf",
    "llava-phi3/int4-unfused-fp16": "764333c6d556c53ea1c3441801f590a1e3b31ec3b599fd1df3baa0827d31cb75",
    "llava-phi3/twin": "452b9514e22ef83d2471b2db771d61370ade186e63f184225ba29dcc63fc4b87",
    "llava-phi3/per-channel": "ce9baa90f4efabdca9b334b8607f49464d988568d90d7730c03c1028a3cd3072",
    "llava-phi3/head8": "c0e6e12ec93c9a6b583a8d7302aa4c50eb4beb7f03105cd4ca138217012355db",
    "llava-phi3/head4": "3bd91757a18ecc79c111d20702609882a55e156e783153a895fd5795a5daa37f",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    return {family: integer_weights(build_checkpoint(root / family, family)[0]) for family in FAMILIES}


def integer_weights(model):
    """Every decoder parameter set to multiples of 1/64 in [-0.47, 0.47] (exact in fp16), by position."""
    params = dict(model.model.language_model.named_parameters())
    params.update({f"lm_head.{k}": v for k, v in model.lm_head.named_parameters()})
    with torch.no_grad():
        for j, name in enumerate(sorted(params)):
            p = params[name]
            v = ((np.arange(p.numel(), dtype=np.int64) * 37 + 11 * j) % 61 - 30) / 64
            p.copy_(torch.from_numpy(v.astype(np.float32)).reshape(p.shape))
    return model


def graph_digest(path) -> str:
    """sha256 of the graph file and its data file, the rotary tables' bytes in it zeroed."""
    proto = onnx.load(str(path), load_external_data=False)
    data = bytearray(path.with_name(path.name + ".data").read_bytes())
    for t in proto.graph.initializer:
        if t.name.startswith("rotary."):
            info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
            data[info["offset"]:info["offset"] + info["length"]] = bytes(info["length"])
    return hashlib.sha256(path.read_bytes() + bytes(data)).hexdigest()


def test_builder_for_picks_the_family_class(models):
    assert [builder_for(models[f]) for f in FAMILIES] == [DecoderBuilder, DecoderBuilder, DecoderBuilder,
                                                          Qwen2Builder, Phi3Builder]
    assert set(BUILDERS) == {"llama", "mistral", "qwen2", "phi3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_bytes_are_the_single_loop_builders(models, tmp_path, family):
    got = {}
    for option, kw in OPTIONS.items():
        path = tmp_path / option / "decoder_fast.onnx"
        path.parent.mkdir()
        build_fast_decoder(models[family], path, FastDecoderConfig(**kw, positions=False))
        got[option] = graph_digest(path)
    want = {o: DIGESTS[f"{family}/{o}"] for o in OPTIONS}
    assert got == want


@pytest.mark.parametrize("option", ["default", "unfused", "int4"])
def test_position_input_changes_only_the_attention_wiring(models, tmp_path, option):
    """With position_ids: every initializer of the old graph, byte for byte (plus the q|k|v split sizes when
    fused), one more input, and per layer RotaryEmbedding on q and k feeding GroupQueryAttention without rotary."""
    graphs = {}
    for positions in (False, True):
        path = tmp_path / str(positions) / "decoder_fast.onnx"
        path.parent.mkdir()
        build_fast_decoder(models["llava-hf-gqa"], path, FastDecoderConfig(**OPTIONS[option], positions=positions))
        graphs[positions] = onnx.load(str(path))
    old, new = graphs[False].graph, graphs[True].graph
    assert [i.name for i in new.input] == [*[i.name for i in old.input][:4], "position_ids",
                                           *[i.name for i in old.input][4:]]
    old_inits = {t.name: t.SerializeToString() for t in old.initializer}
    new_inits = {t.name: t.SerializeToString() for t in new.initializer}
    extra = {"const.qkv_split"} if OPTIONS[option].get("fuse", True) else set()
    assert set(new_inits) == set(old_inits) | extra
    assert all(new_inits[k] == v for k, v in old_inits.items())
    layers = models["llava-hf-gqa"].config.text_config.num_hidden_layers
    ops = [n.op_type for n in new.node]
    assert ops.count("RotaryEmbedding") == 2 * layers and ops.count("GroupQueryAttention") == layers
    for n in new.node:
        if n.op_type == "GroupQueryAttention":
            assert {a.name: a.i for a in n.attribute}["do_rotary"] == 0 and len(n.input) == 7


def test_rotary_tables(models, tmp_path):
    """The part the digests leave out: cos/sin as transformers computes them (Phi-3: longrope's short
    factors, attention scaling)."""
    from onnx import numpy_helper

    model = models["llava-phi3"]
    path = tmp_path / "decoder_fast.onnx"
    build_fast_decoder(model, path, FastDecoderConfig())
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    inv, scaling = rotary_inv_freq(model.model.language_model.rotary_emb)
    freqs = np.outer(np.arange(model.config.text_config.max_position_embeddings), inv.numpy().astype(np.float64))
    np.testing.assert_allclose(numpy_helper.to_array(inits["rotary.cos_cache"]), np.cos(freqs) * scaling, atol=1e-4)
    np.testing.assert_allclose(numpy_helper.to_array(inits["rotary.sin_cache"]), np.sin(freqs) * scaling, atol=1e-4)


def test_qwen2_without_its_bias_is_refused(models, tmp_path):
    model = models["llava-qwen2"]
    layer = model.model.language_model.layers[0]
    bias = layer.self_attn.k_proj.bias
    try:
        layer.self_attn.k_proj.bias = None
        with pytest.raises(ValueError, match="q/k/v bias"):
            build_fast_decoder(model, tmp_path / "d.onnx", FastDecoderConfig())
    finally:
        layer.self_attn.k_proj.bias = bias

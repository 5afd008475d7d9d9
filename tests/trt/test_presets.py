"""Memory budget arithmetic, target detection, limits and optimization-profile shapes (pure Python)."""

from __future__ import annotations

import pytest

from llava_edge.trt import presets as tp
from llava_edge.trt.presets import GiB, LLAVA_15_7B, PRESETS


def test_kv_cache_formula_llava_7b():
    # 2 (k,v) * 32 layers * 32 kv heads * 128 dims * 2 bytes = 512 KiB per token
    assert tp.kv_cache_bytes(LLAVA_15_7B, context=1, batch=1) == 512 * 1024
    assert tp.kv_cache_bytes(LLAVA_15_7B, 2048, 1) == 1 * GiB
    assert tp.kv_cache_bytes(LLAVA_15_7B, 2048, 2, kv_buffers=2) == 4 * GiB
    assert tp.kv_cache_bytes(LLAVA_15_7B, 1024, 1, bytes_per_elem=1) == GiB // 4


def test_weight_bytes_7b_int4_vs_fp16():
    w4 = tp.weight_bytes_from_dims(LLAVA_15_7B, 4, 128)
    w16 = tp.weight_bytes_from_dims(LLAVA_15_7B, 16)
    # 6.48 B linear params: int4 = 3.24 GB + 1 fp16 scale per 128 (0.10 GB) + fp16 lm_head 0.26 GB
    assert 3.55e9 < w4["decoder"] < 3.65e9
    assert 13.2e9 < w16["decoder"] < 13.3e9
    assert w4["vision"] == w16["vision"] and 0.6e9 < w4["vision"] < 0.65e9  # CLIP-L/336 (23 layers) + projector
    assert w4["embed"] == 32064 * 4096 * 2


def test_orin_nano_7b_int4_verdict():
    """The question of the issue: LLaVA-1.5-7B int4 + fp16 CLIP-L on Orin Nano 8 GB (6 GiB usable)."""
    nano = PRESETS["orin-nano"]
    w = tp.weight_bytes_from_dims(LLAVA_15_7B, 4)
    ping = tp.max_context_that_fits(nano, LLAVA_15_7B, w, batch=1, kv_layout="ping-pong")
    inplace = tp.max_context_that_fits(nano, LLAVA_15_7B, w, batch=1, kv_layout="in-place")
    # ping-pong fits one image (576 tokens) + a short question and answer, not the preset's 1024;
    # the in-place cache (one buffer, chunked prefill) fits the preset's 1024 with room to spare
    assert 640 <= ping < 1024
    assert inplace >= 1280 and inplace > ping + 512
    assert not tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 576 + 256, kv_layout="ping-pong").fits
    assert tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 576 + 256).fits
    # fp16 7B does not fit an 8 GB or 16 GB Orin at all
    w16 = tp.weight_bytes_from_dims(LLAVA_15_7B, 16)
    assert tp.max_context_that_fits(nano, LLAVA_15_7B, w16) == 0
    assert tp.max_context_that_fits(PRESETS["orin-nx"], LLAVA_15_7B, w16) == 0
    assert tp.max_context_that_fits(PRESETS["orin-agx"], LLAVA_15_7B, w16) >= 4096


def test_max_context_is_the_boundary():
    p = PRESETS["orin-nx"]
    w = tp.weight_bytes_from_dims(LLAVA_15_7B, 4)
    c = tp.max_context_that_fits(p, LLAVA_15_7B, w, batch=2, multiple=64)
    pf = LLAVA_15_7B.num_image_tokens + p.prompt_text_tokens
    assert c % 64 == 0 and c > 0
    assert tp.estimate_memory(p, LLAVA_15_7B, w, c, 2, min(pf, c)).fits
    assert not tp.estimate_memory(p, LLAVA_15_7B, w, c + 64, 2, min(pf, c + 64)).fits


def test_budget_total_and_describe():
    b = tp.estimate_memory(PRESETS["orin-nano"], LLAVA_15_7B, {"decoder": GiB}, 1024, 1, 600, workspace_gb=0.5)
    assert b.total == GiB + b.kv_cache + b.kv_staging + b.activations + int(0.5 * GiB) + int(0.6 * GiB)
    assert b.headroom == b.usable_bytes - b.total
    assert "fits" in b.describe() and b.as_dict()["fits"] is b.fits


def test_inplace_cache_is_half_plus_one_chunk_of_staging():
    """In-place: one cache buffer + the new k/v of one prefill chunk (256 tokens); ping-pong: two."""
    nano, w = PRESETS["orin-nano"], {"decoder": GiB}
    ip = tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 832)
    pp = tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 832, kv_layout="ping-pong")
    assert pp.kv_cache == 2 * ip.kv_cache == GiB and pp.kv_staging == 0
    assert ip.kv_staging == tp.kv_cache_bytes(LLAVA_15_7B, tp.STATIC_PREFILL_CHUNK, 1) == GiB // 8
    assert ip.activations < pp.activations  # prefill in 256-token chunks instead of 832 at once
    assert (ip.kv_layout, ip.kv_buffers, pp.kv_buffers) == ("in-place", 1, 2)
    assert "in-place: 1 buffer" in ip.describe() and "staging" in ip.describe()
    with pytest.raises(ValueError, match="kv_layout"):
        tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 832, kv_layout="paged")


def test_orin_summary_rows():
    rows = {r["target"]: r for r in tp.orin_summary()}
    pingpong = [rows[t]["max_context_pingpong"] for t in ("orin-nano", "orin-nx", "orin-agx")]
    assert pingpong[0] < pingpong[1] < pingpong[2]
    assert all(r["max_context_inplace"] > r["max_context_pingpong"] for r in rows.values())


@pytest.mark.parametrize("name,mem,expected", [
    ("Orin", 7.4 * GiB, "orin-nano"), ("Orin", 15.3 * GiB, "orin-nx"), ("Orin", 61 * GiB, "orin-agx"),
    ("NVIDIA A100-SXM4-80GB", 80 * GiB, "datacenter"),
])
def test_detect_target(name, mem, expected):
    t = tp.detect_target(name, int(mem))
    assert t.name == expected
    if expected == "datacenter":
        assert t.usable_gb == pytest.approx(80 * 0.9, rel=0.01)


def test_orin_presets_facts():
    for n in ("orin-nano", "orin-nx", "orin-agx"):
        p = PRESETS[n]
        assert p.compute_capability == "8.7" and not p.fp8 and p.unified_memory
        assert p.jetpack_trt["6.x"] == "10.3"


def test_resolve_limits_caps_context_and_prompt():
    p = PRESETS["orin-agx"]
    lim = tp.resolve_limits(p, model_max_context=256, num_image_tokens=16)
    assert lim.max_context == 256 and lim.max_prompt <= 255 and lim.max_batch == p.max_batch
    lim = tp.resolve_limits(p, 4096, 576, max_batch=1, max_context=2048, max_images=1)
    assert lim.max_prompt == 576 + p.prompt_text_tokens and lim.max_batch == 1
    with pytest.raises(ValueError):
        tp.BuildLimits(max_batch=0, max_context=10, max_images=1, max_prompt=5, workspace_gb=1)
    with pytest.raises(ValueError):
        tp.BuildLimits(max_batch=1, max_context=10, max_images=1, max_prompt=11, workspace_gb=1)


def test_profile_shapes_match_decoder_inputs(trt_package):
    import onnx

    from llava_edge.package import load_manifest

    m = load_manifest(trt_package)
    lim = tp.resolve_limits(PRESETS["orin-agx"], m.text.max_context, m.vision.num_image_tokens, max_batch=3)
    dec_inputs = [i.name for i in onnx.load(str(trt_package / "decoder.onnx"), load_external_data=False).graph.input]
    t, c = m.text, lim.max_context
    for layout in ("in-place", "ping-pong"):
        profs = tp.profile_shapes(m, lim, layout)
        prefill, decode = profs["decoder"]
        for prof in (prefill, decode):
            assert list(prof.shapes) == dec_inputs  # the static graph has the portable graph's inputs
            for name, (mn, opt, mx) in prof.shapes.items():
                assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), (prof.name, name)
        assert decode.shapes["inputs_embeds"][2] == (3, 1, t.hidden_size)  # decode: exactly one token
        assert decode.shapes["inputs_embeds"][0][1] == 1
        s = m.vision.image_size
        assert profs["vision"][0].shapes["pixel_values"][2] == (3 * lim.max_images, 3, s, s)
        assert profs["embed"][0].shapes["input_ids"][2] == (3, lim.max_prompt)
    # ping-pong: past grows, prefill on an empty cache, in one piece
    prefill, decode = tp.profile_shapes(m, lim, "ping-pong")["decoder"]
    assert decode.shapes["past_key_values.0.key"][2] == (3, t.num_kv_heads, c - 1, t.head_dim)
    assert decode.shapes["attention_mask"][2] == (3, c)
    assert prefill.shapes["past_key_values.1.value"][2][2] == 0
    assert prefill.shapes["inputs_embeds"][2][1] == lim.max_prompt
    # in-place: past is the whole cache in both profiles; decode fixed but for the batch (CUDA graphs)
    prefill, decode = tp.profile_shapes(m, lim, "in-place")["decoder"]
    chunk = min(lim.max_prompt, tp.STATIC_PREFILL_CHUNK)
    for prof in (prefill, decode):
        mn, opt, mx = prof.shapes["past_key_values.0.value"]
        assert mn[1:] == opt[1:] == mx[1:] == (t.num_kv_heads, c, t.head_dim)
    assert {s[1:] for s in decode.shapes["attention_mask"]} == {(c + 1,)}
    assert prefill.shapes["inputs_embeds"][2][1] == chunk
    assert prefill.shapes["attention_mask"][0][1] == c + 1 and prefill.shapes["attention_mask"][2][1] == c + chunk


def test_plugin_attention_budget_has_no_staging_scores_or_concat():
    """The plugin-attention decoder writes the cache itself (no new-k/v staging) and its flash kernel
    materialises neither the scores [B, H, T, ctx] nor concat(cache, new): the budget drops exactly
    those, and a larger context fits the same Orin."""
    nano = PRESETS["orin-nano"]
    w = tp.weight_bytes_from_dims(LLAVA_15_7B, 4)
    static = tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 832)
    fused = tp.estimate_memory(nano, LLAVA_15_7B, w, 1024, 1, 832, fused_attention=True)
    t = tp.STATIC_PREFILL_CHUNK
    d = LLAVA_15_7B
    scores = 2 * d.num_heads * t * 1024 * 2
    concat = 2 * d.num_kv_heads * (1024 + t) * d.head_dim * 2
    assert fused.kv_staging == 0 and static.kv_staging == tp.kv_cache_bytes(d, t, 1)
    assert static.activations - fused.activations == pytest.approx(1.5 * (scores + concat), abs=2)
    assert fused.kv_cache == static.kv_cache and "staging" not in fused.describe()
    assert (tp.max_context_that_fits(nano, d, w, fused_attention=True)
            > tp.max_context_that_fits(nano, d, w))
    with pytest.raises(Exception, match="in-place"):
        tp.estimate_memory(nano, d, w, 1024, 1, 832, kv_layout="ping-pong", fused_attention=True)

"""The references themselves, checked against independent formulations (HF-style rotate_half,
hand-packed bytes, prefill/decode agreement) so the kernel tests compare to something trustworthy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llava_edge.kernels.reference import (  # noqa: E402
    apply_rope,
    decode_attention_ref,
    int4_matmul_ref,
    pack_int4,
    prefill_attention_ref,
    rope_cos_sin,
    unpack_int4,
)


def test_rope_matches_hf_rotate_half() -> None:
    # HF LlamaRotaryEmbedding: emb = cat(freqs, freqs); q * cos(emb) + rotate_half(q) * sin(emb)
    D, P = 16, 9
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(P).float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    x = torch.randn(P, D)
    rotate_half = torch.cat([-x[:, D // 2 :], x[:, : D // 2]], dim=-1)
    expected = x * emb.cos() + rotate_half * emb.sin()
    cos, sin = rope_cos_sin(P, D)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_pack_int4_byte_layout() -> None:
    # Row 0: elements 0 and 1 share byte 0 -> low nibble = q0 + 8, high nibble = q1 + 8.
    w = np.zeros((2, 32), np.float32)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, -7.0, 1.0
    w[1, 31] = -3.5
    qweight, scales = pack_int4(w, 32)
    assert qweight.dtype == np.uint8 and qweight.shape == (2, 16)
    assert scales.dtype == np.float16 and scales.shape == (2, 1)
    assert scales[0, 0] == np.float16(1.0) and scales[1, 0] == np.float16(0.5)
    assert qweight[0, 0] == (7 + 8) | ((-7 + 8) << 4)
    assert qweight[0, 1] == (1 + 8) | (8 << 4)  # element 3 is 0 -> nibble 8
    assert qweight[1, 15] == 8 | ((-7 + 8) << 4)  # element 31 in the HIGH nibble of the last byte
    np.testing.assert_array_equal(unpack_int4(qweight, scales, 32), w)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_pack_unpack_roundtrip_error_bounded(group_size: int) -> None:
    w = np.random.default_rng(0).standard_normal((7, 256)).astype(np.float32)
    qweight, scales = pack_int4(w, group_size)
    deq = unpack_int4(qweight, scales, group_size)
    step = np.repeat(scales.astype(np.float32), group_size, axis=1)
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-3 * np.abs(w))  # at most half a step (+fp16 scale)
    deq_t = unpack_int4(torch.from_numpy(qweight), torch.from_numpy(scales), group_size)
    np.testing.assert_array_equal(deq_t.numpy(), deq)


def test_pack_int4_rejects_bad_group() -> None:
    with pytest.raises(ValueError):
        pack_int4(np.zeros((2, 48), np.float32), 32)
    with pytest.raises(ValueError):
        pack_int4(np.zeros((2, 64), np.float32), 16)


def test_int4_matmul_ref_is_x_times_w_transposed() -> None:
    w = torch.randn(5, 64)
    qweight, scales = pack_int4(w, 32)
    x = torch.randn(3, 64)
    deq = torch.from_numpy(unpack_int4(qweight, scales, 32))
    torch.testing.assert_close(int4_matmul_ref(x, torch.from_numpy(qweight), torch.from_numpy(scales), 32), x @ deq.T)


def test_decode_after_prefill_equals_longer_prefill() -> None:
    # Prefill T tokens then decode token T must give the same cache and the same last row as a
    # prefill of T + 1 tokens: ties the two references' position/causality conventions together.
    B, T, H, kvH, D, S = 2, 6, 4, 2, 16, 12
    q, k, v = torch.randn(B, T + 1, H, D), torch.randn(B, T + 1, kvH, D), torch.randn(B, T + 1, kvH, D)
    cos, sin = rope_cos_sin(S, D)
    kc1, vc1 = torch.zeros(B, kvH, S, D), torch.zeros(B, kvH, S, D)
    lens = torch.full((B,), T, dtype=torch.int32)
    prefill_attention_ref(q[:, :T], k[:, :T], v[:, :T], kc1, vc1, lens, cos, sin)
    out_dec = decode_attention_ref(q[:, T], k[:, T], v[:, T], kc1, vc1, lens, cos, sin)
    kc2, vc2 = torch.zeros(B, kvH, S, D), torch.zeros(B, kvH, S, D)
    out_pre = prefill_attention_ref(q, k, v, kc2, vc2, lens + 1, cos, sin)
    torch.testing.assert_close(out_dec, out_pre[:, T])
    torch.testing.assert_close(kc1, kc2)
    torch.testing.assert_close(vc1, vc2)

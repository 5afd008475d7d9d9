"""Fused decode attention vs ``decode_attention_ref`` (TRITON_INTERPRET=1 on CPU).

Poisoning: the output and every cache slot at or after ``seq_lens[b]`` start as NaN, so an output
element the kernel forgets to write, a cache slot it writes by mistake, or a read past the valid
context (NaN * 0 is NaN) all fail.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from llava_edge.kernels.decode_attention import DecodeWorkspace, decode_attention  # noqa: E402
from llava_edge.kernels.prefill_attention import prefill_attention  # noqa: E402
from llava_edge.kernels.reference import decode_attention_ref, prefill_attention_ref, rope_cos_sin  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (batch, heads, kv_heads, head_dim, max_seq, num_splits): GQA 2, MQA, MHA, GQA 3 with batch 1 long
# context and more splits than the context needs (empty splits must contribute nothing).
CASES = [
    (3, 4, 2, 32, 37, 1),
    (3, 8, 1, 32, 45, 4),
    (2, 4, 4, 64, 29, 2),
    (1, 6, 2, 32, 131, 8),
]


def _poisoned_cache(B: int, kvH: int, S: int, D: int, lens: torch.Tensor, dtype, device) -> torch.Tensor:
    cache = torch.randn(B, kvH, S, D, device=device).to(dtype)
    for b in range(B):
        cache[b, :, int(lens[b]) :] = float("nan")
    return cache


@pytest.mark.parametrize("B,H,kvH,D,S,splits", CASES)
def test_decode_matches_reference(device, dtype, B, H, kvH, D, S, splits) -> None:
    lens = torch.randint(0, S, (B,), dtype=torch.int32)
    lens[0] = S - 1  # the last free slot
    if B > 1:
        lens[1] = 0  # empty cache: attends to the new token only
    q = torch.randn(B, H, D, device=device).to(dtype)
    k = torch.randn(B, kvH, D, device=device).to(dtype)
    v = torch.randn(B, kvH, D, device=device).to(dtype)
    k_cache = _poisoned_cache(B, kvH, S, D, lens, dtype, device)
    v_cache = _poisoned_cache(B, kvH, S, D, lens, dtype, device)
    cos, sin = rope_cos_sin(S, D, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = decode_attention_ref(q, k, v, k_ref, v_ref, lens.to(device), cos, sin)

    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, k_cache, v_cache, lens.to(device), cos, sin,
                           num_splits=splits, block_n=16, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    # exactly slot seq_lens[b] written (NaN elsewhere must survive), values rotated like the reference
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True)


def test_prefill_then_decode_steps_reuse_workspace(device, dtype) -> None:
    """A short generation: ragged prefill, then decode steps sharing one workspace (the kernel must
    leave its split counters at zero, or the second step would merge too early)."""
    B, T, H, kvH, D, S, splits = 3, 7, 4, 2, 32, 24, 4
    lens = torch.tensor([7, 1, 4], dtype=torch.int32, device=device)
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    q, k, v = mk(B, T, H, D), mk(B, T, kvH, D), mk(B, T, kvH, D)
    k_cache = torch.full((B, kvH, S, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    cos, sin = rope_cos_sin(S, D, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    prefill_attention(q, k, v, k_cache, v_cache, lens, cos, sin, block_m=16, block_n=16)
    prefill_attention_ref(q, k, v, k_ref, v_ref, lens, cos, sin)
    ws = DecodeWorkspace.allocate(B, H, kvH, D, splits, device)
    for _ in range(3):
        qs, ks, vs = mk(B, H, D), mk(B, kvH, D), mk(B, kvH, D)
        out = decode_attention(qs, ks, vs, k_cache, v_cache, lens, cos, sin,
                               num_splits=splits, block_n=16, workspace=ws)
        expected = decode_attention_ref(qs, ks, vs, k_ref, v_ref, lens, cos, sin)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        assert int(ws.counters.abs().sum()) == 0
        lens = lens + 1
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True)


def test_decode_rejects_what_it_cannot_do(device) -> None:
    B, H, kvH, D, S = 1, 4, 2, 32, 16
    q, k = torch.randn(B, H, D, device=device), torch.randn(B, kvH, D, device=device)
    cache = torch.zeros(B, kvH, S, D, device=device)
    cos, sin = rope_cos_sin(S, D, device=device)
    lens = torch.zeros(B, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, k, cache, cache.clone(), lens, cos, sin, num_splits=3)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(B, kvH, D, S, device=device).transpose(2, 3)
        decode_attention(q, k, k, strided, strided, lens, cos, sin)
    with pytest.raises(ValueError, match="workspace"):
        ws = DecodeWorkspace.allocate(B, H, kvH, D, 2, device)
        decode_attention(q, k, k, cache, cache.clone(), lens, cos, sin, num_splits=4, workspace=ws)


def test_short_sequence_in_long_cache_uses_every_split(device) -> None:
    """Splits share out each sequence's own length, not the cache's: 41 positions over 4 splits of
    16-token blocks give three busy splits (positions 0-15, 16-31, 32-40) and one empty, where
    sizing splits by the 131-slot cache would leave everything to split 0 (batch 1 would then use a
    quarter of the programs it launches on a GPU)."""
    B, H, kvH, D, S, splits = 1, 4, 2, 32, 131, 4
    lens = torch.tensor([40], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(B, n, D, device=device) for n in (H, kvH, kvH))
    k_cache = _poisoned_cache(B, kvH, S, D, lens, torch.float32, device)
    v_cache = _poisoned_cache(B, kvH, S, D, lens, torch.float32, device)
    cos, sin = rope_cos_sin(S, D, device=device)
    expected = decode_attention_ref(q, k, v, k_cache.clone(), v_cache.clone(), lens, cos, sin)
    ws = DecodeWorkspace.allocate(B, H, kvH, D, splits, device)
    out = decode_attention(q, k, v, k_cache, v_cache, lens, cos, sin, num_splits=splits, block_n=16, workspace=ws)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    running_max = ws.partial_ml[0, :, :, 0].cpu()  # [H, splits]
    assert torch.isfinite(running_max[:, :3]).all(), running_max
    assert torch.isneginf(running_max[:, 3]).all(), running_max

"""Causal prefill flash attention vs ``prefill_attention_ref`` (TRITON_INTERPRET=1 on CPU).

Poisoning: output and every cache slot at or after ``start_pos[b]`` start as NaN; padding rows must
come out as exactly 0, slots past the prompt must stay NaN.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from llava_edge.kernels.prefill_attention import prefill_attention  # noqa: E402
from llava_edge.kernels.reference import prefill_attention_ref, rope_cos_sin  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (batch, padded prompt length, heads, kv_heads, head_dim, max_seq, reuse a cached prefix)
CASES = [
    (3, 37, 4, 2, 32, 64, False),  # odd length, GQA 2, ragged incl. a 1-token prompt
    (2, 21, 6, 2, 64, 50, True),  # GQA 3, prefix reuse
    (2, 17, 2, 1, 32, 40, True),  # MQA
    (1, 33, 4, 4, 32, 33, False),  # MHA, prompt fills the cache exactly
]


@pytest.mark.parametrize("B,T,H,kvH,D,S,prefix", CASES)
def test_prefill_matches_reference(device, dtype, B, T, H, kvH, D, S, prefix) -> None:
    lens = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    lens[0] = T
    if B > 2:
        lens[2] = 1
    start = torch.randint(0, S - T + 1, (B,), dtype=torch.int32) if prefix else torch.zeros(B, dtype=torch.int32)
    mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    q, k, v = mk(B, T, H, D), mk(B, T, kvH, D), mk(B, T, kvH, D)
    k_cache, v_cache = mk(B, kvH, S, D), mk(B, kvH, S, D)
    for b in range(B):
        k_cache[b, :, int(start[b]) :] = float("nan")
        v_cache[b, :, int(start[b]) :] = float("nan")
    cos, sin = rope_cos_sin(S, D, device=device)
    lens, start = lens.to(device), start.to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = prefill_attention_ref(q, k, v, k_ref, v_ref, lens, cos, sin, start_pos=start if prefix else None)

    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k, v, k_cache, v_cache, lens, cos, sin, start_pos=start if prefix else None,
                      block_m=16, block_n=16, out=out)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    for b in range(B):
        assert torch.all(out[b, int(lens[b]) :] == 0), "padding rows must be written as 0"
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True)


def test_prefill_block_sizes_do_not_change_the_result(device) -> None:
    # BLOCK_M != BLOCK_N: the diagonal tile is no longer square, the causal mask must still hold.
    B, T, H, kvH, D, S = 2, 45, 4, 2, 32, 48
    lens = torch.tensor([45, 30], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(B, T, H, D, device=device), torch.randn(B, T, kvH, D, device=device),
               torch.randn(B, T, kvH, D, device=device))
    cos, sin = rope_cos_sin(S, D, device=device)
    outs = []
    for bm, bn in [(16, 32), (32, 16)]:
        kc, vc = torch.zeros(B, kvH, S, D, device=device), torch.zeros(B, kvH, S, D, device=device)
        outs.append(prefill_attention(q, k, v, kc, vc, lens, cos, sin, block_m=bm, block_n=bn))
    kc, vc = torch.zeros(B, kvH, S, D, device=device), torch.zeros(B, kvH, S, D, device=device)
    expected = prefill_attention_ref(q, k, v, kc, vc, lens, cos, sin)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

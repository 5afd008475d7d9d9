"""int4 GEMV/GEMM vs ``int4_matmul_ref`` on weights packed by ``reference.pack_int4``.

Outputs are NaN-poisoned; N is odd so the last tile is partial; M covers a single row, the GEMV/GEMM
switch and a ragged last row tile.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from llava_edge.kernels.int4_matmul import GEMV_MAX_ROWS, int4_gemm, int4_gemv, int4_matmul  # noqa: E402
from llava_edge.kernels.reference import int4_matmul_ref, pack_int4  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-3),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}
CASES = [(1, 37, 128, 32), (3, 50, 256, 64), (19, 45, 256, 128), (5, 33, 64, 32)]  # (M, N, K, group)


def _packed(N: int, K: int, g: int, device: str):
    qweight, scales = pack_int4(torch.randn(N, K), g)
    return torch.from_numpy(qweight).to(device), torch.from_numpy(scales).to(device)


@pytest.mark.parametrize("M,N,K,g", CASES)
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_int4_kernels_match_reference(device, dtype, M, N, K, g, kernel) -> None:
    qweight, scales = _packed(N, K, g, device)
    x = torch.randn(M, K, device=device).to(dtype)
    expected = int4_matmul_ref(x, qweight, scales, g)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    if kernel == "gemv":
        int4_gemv(x, qweight, scales, g, block_n=16, out=out)
    else:
        int4_gemm(x, qweight, scales, g, block_m=16, block_n=16, out=out)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("g,block_k", [(64, 16), (32, 128), (32, 256), (128, 256)])
def test_int4_gemv_tiles_span_part_of_a_group_or_several(device, dtype, g, block_k) -> None:
    """K = 384: tiles of 4 groups fit exactly; 256-wide tiles overhang K (the last tile is half
    outside, and with group 128 names a group that does not exist): both must be masked, not read."""
    M, N, K = 2, 37, 384
    qweight, scales = _packed(N, K, g, device)
    x = torch.randn(M, K, device=device).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    int4_gemv(x, qweight, scales, g, block_n=8, block_k=block_k, out=out)
    torch.testing.assert_close(out, int4_matmul_ref(x, qweight, scales, g), **TOL[dtype])


def test_int4_matmul_keeps_leading_dims_and_picks_by_rows(device, monkeypatch) -> None:
    import llava_edge.kernels.int4_matmul as mod

    qweight, scales = _packed(24, 128, 64, device)
    used = []
    for name in ("int4_gemv", "int4_gemm"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **kw: used.append(_n) or _r(*a, **kw))
    for rows in (GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = torch.randn(1, rows, 128, device=device)
        y = int4_matmul(x, qweight, scales, 64)
        assert y.shape == (1, rows, 24)
        torch.testing.assert_close(y, int4_matmul_ref(x, qweight, scales, 64), atol=1e-4, rtol=1e-4)
    assert used == ["int4_gemv", "int4_gemm"]


def test_int4_rejects_mismatched_packing(device) -> None:
    qweight, scales = _packed(8, 128, 64, device)
    x = torch.randn(2, 128, device=device)
    with pytest.raises(ValueError, match="scales"):
        int4_gemv(x, qweight, scales[:, :1], 64)  # scales for group 128 given with group 64
    with pytest.raises(ValueError, match="qweight"):
        int4_gemm(torch.randn(2, 64, device=device), qweight, scales, 64)
    with pytest.raises(ValueError, match="block_k"):
        int4_gemm(x, qweight, scales, 64, block_k=128)
    with pytest.raises(ValueError, match="block_k"):
        int4_gemv(x, qweight, scales, 64, block_k=96)  # not a power of two

"""GPTQ (Frantar et al., 2022): quantize one Linear column by column, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of the layer's
reconstruction loss ``||X W^T - X Q^T||^2`` (H = 2 X^T X, from real calibration activations).

Implementation notes (the parts that decide quality and memory):

* Lazy block updates: errors are applied inside a block of ``blocksize`` columns eagerly and to the
  rest of the matrix once per block (one GEMM), as in the reference implementation.
* Act-order (``desc_act``) visits columns by decreasing Hessian diagonal. With it we use *static
  groups*: every group's scale is computed from the original, unpermuted weight before any update,
  so a stored group is still ``g`` consecutive input channels and the runtime needs no g_idx.
  Without act-order, scales are computed when the sweep enters a group, from the already
  error-corrected weights (the classic, slightly better choice, equally g_idx-free).
* Damping starts at ``damp * mean(diag H)`` and is multiplied by 10 whenever the Cholesky
  factorization fails (rank-deficient H from few calibration tokens); the damp used is recorded.
* Works on whatever device the weight is on (CPU here; CUDA when present).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import QuantizedLinear, qrange
from .rtn import check_group_size, group_scales


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    blocksize: int = 128
    max_damp_retries: int = 6
    scale_dtype: torch.dtype = torch.float32


@dataclass
class GPTQResult:
    quantized: QuantizedLinear
    weight: torch.Tensor  # the float weights the sweep settled on (q * s as it computed them)
    damp: float  # the relative damping that made H positive definite
    loss: float  # sum of the per-column GPTQ losses (err^2 / d), for diagnostics


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over every token seen by one Linear input."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self.H.mul_(self.nsamples / total)
        x = x * (2.0 / total) ** 0.5
        self.H.addmm_(x.t(), x)
        self.nsamples = total


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 (what the column sweep needs), raising damping on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(retries + 1):
        d = damp * (10.0**attempt)
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0:
                return U, d
    raise RuntimeError(
        f"Hessian is not positive definite even with damping {d:g}; too few calibration tokens "
        "or non-finite activations"
    )


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> GPTQResult:
    """Quantize ``weight`` [N, K] against Hessian ``H`` [K, K]; returns codes in original order."""
    qmin, qmax = qrange(cfg.bits)
    W = weight.detach().to(torch.float32).clone()
    n, k = W.shape
    g = cfg.group_size
    check_group_size(k, g)
    H = H.to(W.device, torch.float32).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static_scales = None
    if cfg.act_order:
        static_scales = torch.stack([group_scales(W[:, j : j + g], cfg.bits, cfg.scale_dtype)
                                     for j in range(0, k, g)], 1)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(k, device=W.device)
    col_group = perm // g  # group of the original column visited at each step

    Hinv, used_damp = _inverse_hessian_cholesky(H, cfg.damp, cfg.max_damp_retries)
    del H

    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    scales = torch.zeros(n, k // g, dtype=torch.float32, device=W.device) if static_scales is None else static_scales
    total_loss = torch.zeros((), device=W.device)
    for i1 in range(0, k, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_scales is None and col % g == 0:
                # Dynamic groups (no act-order): visiting order == storage order, so the group
                # [col, col + g) is scaled from its error-corrected values. Columns beyond this
                # block are already updated by the lazy GEMM at the previous block boundary,
                # except for the part still inside W1, which we take from W1.
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scales[:, col // g] = group_scales(cur, cfg.bits, cfg.scale_dtype)
            s = scales[:, col_group[col]]
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / s), qmin, qmax)
            codes[:, col] = q
            Q[:, col] = q * s
            r = w - q * s
            total_loss += (r * r).sum() / (2 * d * d)  # the reference implementation's loss
            err = r / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if cfg.act_order:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        Q = Q[:, inv]
    q = QuantizedLinear(q=codes.to(torch.int8), scales=scales, bits=cfg.bits, group_size=g)
    return GPTQResult(quantized=q, weight=Q, damp=used_damp, loss=float(total_loss))

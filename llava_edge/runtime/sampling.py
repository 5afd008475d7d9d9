"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded; and the
log-probabilities a request may ask for (``token_logprobs``).

Works on the [B, V] logits of the last position only, in place where it can: the only full-vocabulary
copy per step is the float64 softmax of the rows that sample (greedy rows take an argmax, no copy).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the sequence (CTRL rule)
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, not {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise UsageError(f"top_k must be an integer, not {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise UsageError(f"seed must be a non-negative integer, not {self.seed!r}")
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UsageError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise UsageError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def apply_repetition_penalty(self, logits: np.ndarray, seen: list[np.ndarray]) -> None:
        p = self.config.repetition_penalty
        if p == 1.0:
            return
        for row, ids in zip(logits, seen):
            if len(ids):
                u = np.unique(ids)
                vals = row[u]
                with np.errstate(over="ignore", divide="ignore"):
                    row[u] = np.where(vals > 0, vals / p, vals * p)

    def __call__(self, logits: np.ndarray, seen: list[np.ndarray] | None = None) -> np.ndarray:
        """logits [B, V] (modified in place) -> next token ids [B]."""
        if seen is not None:
            self.apply_repetition_penalty(logits, seen)
        if self.config.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, row: np.ndarray) -> int:
        c = self.config
        with np.errstate(over="ignore"):
            x = row.astype(np.float64) / c.temperature
        x[np.isnan(x)] = -np.inf  # a broken graph's NaN logits are never sampled
        if not np.isfinite(x.max()):  # overflow (a tiny temperature) is greedy; all -inf/NaN takes the argmax
            return int(np.nan_to_num(row, nan=-np.inf).argmax())
        if c.top_k and c.top_k < x.size:
            kth = np.partition(x, -c.top_k)[-c.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cum, c.top_p) + 1)
            keep = order[:cut]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


# OpenAI's stand-in for a log-probability of -inf (JSON has no infinity)
MIN_LOGPROB = -9999.0
MAX_TOP_LOGPROBS = 20


def token_logprobs(raw: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` and the ``top`` most likely tokens with theirs, from ``raw``.

    ``raw`` is one row of the model's own logits [V], as the model produced them: BEFORE the repetition
    penalty, temperature, top-k/top-p and a JSON-schema mask. These are the model's log-probabilities
    (vLLM's default, and what OpenAI reports), the same for a request whatever its sampling settings; the
    chosen token may therefore be one the model itself found unlikely (sampling, or a schema forbade its
    favourite). Computed in float64; a NaN logit counts as -inf, and -inf is reported as ``MIN_LOGPROB``.
    Alternatives are sorted by log-probability, highest first, ties by token id.
    """
    x = np.asarray(raw, dtype=np.float64).reshape(-1)
    x = np.where(np.isnan(x), -np.inf, x)
    m = x.max()
    if not np.isfinite(m):  # all -inf (or +inf somewhere): no distribution to speak of
        lp = np.where(x == m, 0.0, -np.inf) if m > 0 else np.full_like(x, -np.inf)
    else:
        lp = x - (m + np.log(np.exp(x - m).sum()))

    def val(i: int) -> float:
        v = float(lp[i])
        return v if v > MIN_LOGPROB else MIN_LOGPROB

    alts: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, lp.size)
        part = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
        order = part[np.lexsort((part, -lp[part]))]
        alts = [(int(i), val(int(i))) for i in order]
    return val(int(token)), alts

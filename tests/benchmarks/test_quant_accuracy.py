"""The accuracy benchmark's statistics: the paired delta against fp32 and its standard error."""

from __future__ import annotations

import math
import random

import pytest

from llava_edge.benchmarks.quant_accuracy import binomial_se, paired_delta


def test_paired_delta_counts_only_discordant_questions():
    base = [True, True, False, False, True]
    other = [True, False, True, True, True]  # b = 1 (lost), c = 2 (gained)
    d, se = paired_delta(base, other)
    assert d == pytest.approx((2 - 1) / 5)
    assert se == pytest.approx(math.sqrt(3 - 1 / 5) / 5)
    assert paired_delta(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_delta(base, other[:-1])


def test_paired_se_is_below_the_binomial_se_when_rows_agree():
    rng = random.Random(0)
    base = [rng.random() < 0.78 for _ in range(2000)]
    other = [(not x) if rng.random() < 0.02 else x for x in base]  # 2% of answers flip
    d, se = paired_delta(base, other)
    p = sum(base) / len(base)
    assert se < binomial_se(p, len(base)) / 2
    # the empirical spread of the delta over resampled flips matches the formula's SE
    deltas = []
    for seed in range(200):
        r = random.Random(seed)
        o = [(not x) if r.random() < 0.02 else x for x in base]
        deltas.append(paired_delta(base, o)[0])
    mean = sum(deltas) / len(deltas)
    spread = math.sqrt(sum((x - mean) ** 2 for x in deltas) / (len(deltas) - 1))
    assert 0.7 * se < spread < 1.3 * se

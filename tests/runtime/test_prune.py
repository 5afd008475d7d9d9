"""runtime/prune.py on its own: the settings a user can give, the kept count, and each method's selection
against its loop-by-loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from llava_edge.errors import UsageError
from llava_edge.runtime import prune as P
from llava_edge.runtime.prune import OFF, PruneError, PruneMethod, PruneSetting


@pytest.mark.parametrize("text,method,ratio", [("dart:0.5", PruneMethod.DART, 0.5),
                                               (" CDPruner:0.75 ", PruneMethod.CDPRUNER, 0.75),
                                               ("dart:0", PruneMethod.DART, 0.0), ("off", None, 0.0), ("", None, 0.0),
                                               ("none", None, 0.0)])
def test_parse(text, method, ratio):
    s = PruneSetting.parse(text)
    assert (s.method, s.ratio) == (method, ratio)
    assert s.active == (ratio > 0)
    assert PruneSetting.parse(str(s)).active == s.active  # str() reads back


@pytest.mark.parametrize("text,words", [("dart:1", "[0, 1)"), ("dart:-0.1", "[0, 1)"), ("dart:nan", "[0, 1)"),
                                        ("fastv:0.5", "unknown prune method 'fastv'"), ("dart", "METHOD:RATIO"),
                                        ("dart:half", "not a number")])
def test_bad_settings_are_one_usage_error_line(text, words):
    with pytest.raises(PruneError) as e:
        PruneSetting.parse(text)
    assert isinstance(e.value, UsageError) and words in str(e.value) and "\n" not in str(e.value)


def test_kept_count_is_one_rule():
    s = PruneSetting(PruneMethod.DART, 0.75)
    assert [s.kept_count(n) for n in (576, 36, 1, 3)] == [144, 9, 1, 1]
    assert PruneSetting(PruneMethod.DART, 0.5).kept_count(37) == 19  # n - floor(n * ratio)
    assert OFF.kept_count(576) == 576 and PruneSetting(PruneMethod.DART, 0.0).kept_count(36) == 36
    for n in range(1, 80):
        for r in (0.1, 0.25, 0.5, 0.9, 0.99):
            assert 1 <= PruneSetting(PruneMethod.CDPRUNER, r).kept_count(n) <= n


def test_cache_tag_separates_settings_and_questions():
    a, b = np.array([5, 6, 7]), np.array([5, 6, 8])
    dart, cdp = PruneSetting.parse("dart:0.5"), PruneSetting.parse("cdpruner:0.5")
    assert OFF.cache_tag(a) == "" == PruneSetting.parse("dart:0").cache_tag(a)  # nothing dropped: shared
    assert dart.cache_tag(a) == dart.cache_tag(b) != PruneSetting.parse("dart:0.25").cache_tag(a)
    assert cdp.cache_tag(a) != cdp.cache_tag(b)  # question-aware: the kept rows depend on the question
    assert cdp.cache_tag(a) not in (dart.cache_tag(a), "")


@pytest.mark.parametrize("seed", range(12))
def test_dart_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 50))
    x = rng.normal(size=(n, 16)) * rng.uniform(0.2, 3, size=(n, 1))
    for k in {1, 2, n // 3 + 1, n // 2 + 1, n}:
        got = P.dart_select(x, k)
        assert got.tolist() == P.dart_reference(x, k)
        assert len(got) == k and np.all(np.diff(got) > 0)  # in order, no repeats


@pytest.mark.parametrize("seed", range(12))
def test_cdpruner_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 30))
    x, text = rng.normal(size=(n, 12)), rng.normal(size=(int(rng.integers(1, 6)), 12))
    for k in {1, n // 3 + 1, n // 2 + 1, n}:
        got = P.cdpruner_select(x, text, k)
        assert got.tolist() == P.cdpruner_reference(x, text, k)
        assert len(got) == k and np.all(np.diff(got) > 0)


def test_dart_drops_duplicates_first():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 16))
    x = np.concatenate([distinct, distinct[:3] + 1e-4 * rng.normal(size=(3, 16))])  # rows 6..8 repeat rows 0..2
    x[:6] *= np.array([3, 3, 3, 1, 1, 1])[:, None]  # rows 0..2 are the pivots (largest norms)
    keep = P.dart_select(x, 6, pivots=3)
    assert keep.tolist() == [0, 1, 2, 3, 4, 5]


def test_cdpruner_follows_the_question_and_survives_duplicates():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16))
    a = P.cdpruner_select(x, x[[3, 4]] * 2, 8)  # a question "about" tokens 3 and 4
    b = P.cdpruner_select(x, x[[30, 31]] * 2, 8)
    assert {3, 4} <= set(a.tolist()) and {30, 31} <= set(b.tolist()) and a.tolist() != b.tolist()
    dup = np.repeat(rng.normal(size=(3, 8)), 6, axis=0)  # rank 3: the rest is filled in order
    keep = P.cdpruner_select(dup, None, 7)
    assert len(set(keep.tolist())) == 7 and len({tuple(dup[i]) for i in keep}) == 3


def test_apply_keeps_rows_in_order_and_off_is_identity():
    x = np.random.default_rng(2).normal(size=(36, 8)).astype(np.float32)
    assert PruneSetting.parse("off").apply(x) is x
    kept = PruneSetting.parse("dart:0.5").apply(x)
    idx = [int(np.flatnonzero((x == r).all(1))[0]) for r in kept]
    assert kept.shape == (18, 8) and idx == sorted(idx)


def test_instruction_is_the_text_after_the_last_image():
    ids = np.array([1, 9, 9, 2, 9, 9, 3, 4])
    assert P.instruction_ids(ids, 9).tolist() == [3, 4]
    assert P.instruction_ids(np.array([1, 2]), 9).tolist() == []

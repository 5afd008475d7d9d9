"""Per-token log-probabilities (sampling.token_logprobs, Engine._sample) and the JSON schemas that admit no
answer (constrain.admits_finite_value, Grammar's first-token probe)."""

from __future__ import annotations

import numpy as np
import pytest

from llava_edge.runtime.sampling import MIN_LOGPROB, SamplingConfig, token_logprobs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_token_logprobs_is_log_softmax_with_sorted_alternatives():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=300) * 4).astype(np.float32)
    x[7] = x[9] = x.max() + 1  # a tie: lower id first
    ref = _log_softmax(x)
    lp, alts = token_logprobs(x, 42, 5)
    assert lp == pytest.approx(ref[42], abs=1e-9)
    assert [i for i, _ in alts[:2]] == [7, 9]
    assert [v for _, v in alts] == sorted((v for _, v in alts), reverse=True)
    np.testing.assert_allclose([v for _, v in alts], np.sort(ref)[::-1][:5], atol=1e-9)
    assert token_logprobs(x, 0, 0)[1] == []
    assert len(token_logprobs(x, 0, 1000)[1]) == x.size
    y = x.copy()
    y[3] = -np.inf
    y[4] = np.nan
    assert token_logprobs(y, 3, 0)[0] == MIN_LOGPROB and token_logprobs(y, 4, 0)[0] == MIN_LOGPROB


def test_engine_logprobs_are_the_models_and_change_no_token(gqa_fast_package, images):
    """A sequence that asks for logprobs next to one that does not, in one batch: the same greedy ids, and
    each recorded logprob is numpy's log_softmax of the raw logits the engine sampled from."""
    from llava_edge.runtime.pipeline import Pipeline, Request

    pipe = Pipeline.from_package(gqa_fast_package, backend="ort-fast", threads=1, prefix_cache=0)
    engine = pipe.make_engine(max_slots=2, prefill_chunk=16)
    req = Request([("What is in the picture?", None)], [images["landscape"]])
    seen: dict[str, list[np.ndarray]] = {}
    sample = engine._sample

    def spy(seq, logits):
        seen.setdefault(seq.seq_id, []).append(logits.reshape(-1).copy())
        return sample(seq, logits)

    engine._sample = spy
    (asked,) = pipe.sequences([req], 12, SamplingConfig(), engine=engine, top_logprobs=4)
    (plain,) = pipe.sequences([req], 12, SamplingConfig(), engine=engine)
    list(engine.run_until_done([asked, plain]))
    assert asked.generated == plain.generated and len(asked.generated) > 1
    assert plain.logprobs == [] and len(asked.logprobs) == len(asked.generated)
    for tok, raw, (lp, alts) in zip(asked.generated, seen[asked.seq_id], asked.logprobs):
        ref = _log_softmax(raw)
        assert lp == pytest.approx(ref[tok], abs=1e-6)
        assert alts[0][0] == tok and alts[0][1] == lp  # greedy: the chosen token is the most likely
        np.testing.assert_allclose([v for _, v in alts], np.sort(ref)[::-1][:4], atol=1e-6)
    # sampled: the reported logprobs stay the model's, not the temperature-scaled ones
    (hot,) = pipe.sequences([req], 6, SamplingConfig(temperature=1.7, seed=3), engine=engine, top_logprobs=0)
    list(engine.run_until_done([hot]))
    for tok, raw, (lp, alts) in zip(hot.generated, seen[hot.seq_id], hot.logprobs):
        assert alts == [] and lp == pytest.approx(_log_softmax(raw)[tok], abs=1e-6)


def test_token_bytes_join_into_the_answer(gqa_fast_package):
    from tokenizers import Tokenizer

    from llava_edge.runtime.sequence import token_bytes

    tok = Tokenizer.from_file(str(gqa_fast_package / "tokenizer.json"))
    text = "héllo wörld ✓ {\"a\": 1}"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert b"".join(token_bytes(tok, i) for i in ids).decode() == tok.decode(ids)


NEVER_ENDS = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
    {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"},
]
ENDS = [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # the recursion is optional
    {"$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                                   "required": ["next"]}]}}, "$ref": "#/$defs/n"},
    {"type": "array", "items": {"$ref": "#"}},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
]


def test_schemas_that_admit_no_answer_are_refused(gqa_fast_package):
    pytest.importorskip("llguidance", reason="llguidance (the `structured` extra) is not installed")
    from tokenizers import Tokenizer

    from llava_edge.runtime import constrain
    from llava_edge.runtime.constrain import ConstraintError, Grammar, admits_finite_value

    tok = Tokenizer.from_file(str(gqa_fast_package / "tokenizer.json"))
    for schema in NEVER_ENDS:
        assert not admits_finite_value(schema), schema
        with pytest.raises(ConstraintError, match="unsupported JSON schema"):
            Grammar(tok, frozenset([2]), schema)
    for schema in ENDS:
        assert admits_finite_value(schema), schema
        Grammar(tok, frozenset([2]), schema).matcher()
    # without the structural check, llguidance's grammar for {"$ref": "#"} allows nothing but the end:
    # the first-token probe refuses it (before: an empty 200 "stop" answer)
    real = constrain.admits_finite_value
    try:
        constrain.admits_finite_value = lambda schema, budget=0: True
        with pytest.raises(ConstraintError, match="allows no answer"):
            Grammar(tok, frozenset([2]), {"$ref": "#"})
    finally:
        constrain.admits_finite_value = real

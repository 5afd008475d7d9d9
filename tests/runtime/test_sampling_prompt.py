from __future__ import annotations

import numpy as np
import pytest

from llava_edge.runtime.prompt import expand_image_tokens, render
from llava_edge.runtime.sampling import Sampler, SamplingConfig


def test_llava_hf_template_single_and_multi_turn():
    assert render("llava_hf", [("What?", None)], "<image>") == "USER: <image>\nWhat? ASSISTANT:"
    assert render("llava_hf", [("A?", "yes"), ("B?", None)], "<image>") == \
        "USER: <image>\nA? ASSISTANT: yes</s>USER: B? ASSISTANT:"


def test_llava_v1_template_has_vicuna_system_prompt():
    s = render("llava_v1", [("Q", None)], "<image>")
    assert s.startswith("A chat between a curious human") and s.endswith(" USER: <image>\nQ ASSISTANT:")


def test_image_token_placed_once_and_expanded():
    assert render("llava_hf", [("look <image> here", None)], "<image>").count("<image>") == 1
    ids, n = expand_image_tokens([1, 9, 5, 9, 2], image_token_id=9, tokens_per_image=3)
    assert n == 2 and ids.tolist() == [1, 9, 9, 9, 5, 9, 9, 9, 2]


def test_greedy_is_argmax_and_top_k1_equals_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    greedy = Sampler(SamplingConfig())(logits.copy())
    assert greedy.tolist() == logits.argmax(-1).tolist()
    k1 = Sampler(SamplingConfig(temperature=2.0, top_k=1, seed=1))(logits.copy())
    assert k1.tolist() == greedy.tolist()
    tiny_p = Sampler(SamplingConfig(temperature=2.0, top_p=1e-6, seed=1))(logits.copy())
    assert tiny_p.tolist() == greedy.tolist()


def test_sampling_follows_the_distribution_and_seed():
    logits = np.log(np.array([[0.7, 0.2, 0.1]], dtype=np.float32))
    s = Sampler(SamplingConfig(temperature=1.0, seed=0))
    draws = np.array([s(logits.copy())[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
    again = Sampler(SamplingConfig(temperature=1.0, seed=0))
    assert [again(logits.copy())[0] for _ in range(50)] == draws[:50].tolist()
    # top_p=0.8 keeps the two most likely tokens only
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))
    assert {s(logits.copy())[0] for _ in range(500)} == {0, 1}


def test_repetition_penalty_moves_argmax():
    logits = np.array([[2.0, 1.9, -1.0]], dtype=np.float32)
    s = Sampler(SamplingConfig(repetition_penalty=1.2))
    assert s(logits.copy(), [np.array([0])])[0] == 1  # 2.0/1.2 < 1.9
    assert s(logits.copy(), [np.array([2])])[0] == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_invalid_sampling_settings(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)

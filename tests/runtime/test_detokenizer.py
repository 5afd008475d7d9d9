"""The streaming detokenizer: its pieces add up to the full decode, and each token decodes a window."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from llava_edge.export.factory import build_tokenizer
from llava_edge.runtime.pipeline import _Detokenizer

TEXTS = [
    "The cat sat on the mat, twice.  Then it left!",
    "naïve café — 東京 🐈‍⬛ emoji split across byte tokens ✓",
    "  leading spaces and trailing ones   ",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return build_tokenizer()  # byte-level BPE, as LLaMA-3 / GPT-style checkpoints use


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = _Detokenizer(tok)
    return [d.push(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text, add_special_tokens=False).ids
    pieces = _stream(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # never a half character


def test_random_token_sequences(bpe: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, bpe.get_vocab_size(), size=int(rng.integers(1, 60)))]
        full = bpe.decode(ids, skip_special_tokens=True)
        streamed = "".join(_stream(bpe, ids))
        # a random byte sequence may end inside a character: that tail is held back, nothing else
        assert full.startswith(streamed) and full[len(streamed):].strip("\ufffd") == ""


def test_window_stays_short(bpe: Tokenizer) -> None:
    ids = bpe.encode("the cat sat on the mat " * 40, add_special_tokens=False).ids
    lengths = []

    class Spy:
        def decode(self, window, skip_special_tokens=True):
            lengths.append(len(window))
            return bpe.decode(window, skip_special_tokens=skip_special_tokens)

    d = _Detokenizer(Spy())  # type: ignore[arg-type]
    out = "".join(d.push(i) for i in ids)
    assert out == bpe.decode(ids)
    assert len(ids) > 100 and max(lengths) <= 4  # O(window) per token, not O(answer)


def test_word_level_tokenizer_spacing() -> None:
    from llava_edge.synthetic.train import build_tokenizer as word_tokenizer

    tok = word_tokenizer(n_samples=20)
    ids = tok.encode("top left", add_special_tokens=False).ids
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "top left"


def test_stop_string_ends_generation_and_cuts_the_text(tiny_models) -> None:
    from PIL import Image

    from llava_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(tiny_models["llava-hf-v1.5"]["package"], prefix_cache=0)
    image = Image.new("RGB", (32, 24), (200, 30, 30))
    full = pipe.generate(image, "What is in the picture?", max_new_tokens=24)
    text = full.text
    assert len(text) > 12, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a piece from the middle of the answer
    cut = pipe.generate(image, "What is in the picture?", max_new_tokens=24, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)].strip()
    assert len(cut.token_ids) < len(full.token_ids)

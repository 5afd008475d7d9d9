"""Per-token cost of JSON-schema constrained decoding at a real vocabulary size (edge-1b: 32000).

Why a stand-in tokenizer: the random edge-1b checkpoint carries the factory's 384-token BPE, and the
cost of a grammar mask grows with the vocabulary, so this builds a byte-level BPE vocabulary of
32000 tokens (all 256 bytes plus word-like pieces) and times what one sequence adds to one decode
step: llguidance's mask, applying it to a 32000-logit row, and following the drawn token. Logits are
random (sampled at temperature 1), which walks the grammar through every kind of state. The decode
step it is compared with is the measured one in benchmarks/results/cpu_edge-1b.md.

    python -m llava_edge.benchmarks.constrain_cost [--vocab 32000] [--answers 50]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..runtime.constrain import Grammar
from ..runtime.sampling import Sampler, SamplingConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue", "yellow", "purple"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "where": {"type": "object", "properties": {"row": {"type": "integer", "minimum": 0, "maximum": 9},
                                                   "side": {"enum": ["left", "right", "center"]},
                                                   "note": {"type": "string", "maxLength": 24}},
                  "required": ["row", "side", "note"], "additionalProperties": False},
    },
    "required": ["color", "count", "where"],
    "additionalProperties": False,
}


def stand_in_tokenizer(vocab: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE with ``vocab`` tokens: specials, the 256 bytes, then word-like pieces."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    rng = np.random.default_rng(seed)
    pieces = ["<unk>", "<s>", "</s>", *sorted(alphabet)]
    seen = set(pieces)
    letters = list("abcdefghijklmnopqrstuvwxyz") * 4 + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]\":,._-")
    while len(pieces) < vocab:
        n = int(rng.integers(2, 9))
        s = ("Ġ" if rng.random() < 0.5 else "") + "".join(rng.choice(letters, n))
        if s not in seen:
            seen.add(s)
            pieces.append(s)
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def measure(vocab: int = 32000, answers: int = 50, max_tokens: int = 256) -> dict:
    tok = stand_in_tokenizer(vocab)
    t = time.perf_counter()
    grammar = Grammar(tok, frozenset([2]), SCHEMA)
    compile_ms = (time.perf_counter() - t) * 1000
    rng = np.random.default_rng(0)
    per_token, tokens, complete = [], 0, 0
    for seed in range(answers):
        c = grammar.matcher()
        sampler = Sampler(SamplingConfig(temperature=1.0, seed=seed))
        out = []
        for _ in range(max_tokens):
            logits = rng.standard_normal((1, vocab)).astype(np.float32) * 3
            t = time.perf_counter()
            c.mask(logits)
            t_mask = time.perf_counter() - t
            token = int(sampler(logits)[0])  # the sampler's own cost is not the constraint's
            t = time.perf_counter()
            c.advance(token)
            per_token.append((t_mask + time.perf_counter() - t) * 1000)
            if token == 2:
                complete += 1
                break
            out.append(token)
        tokens += len(out)
    ms = np.array(per_token)
    return {"vocab": vocab, "answers": answers, "complete_answers": complete, "tokens": int(ms.size),
            "grammar_compile_ms": round(compile_ms, 2), "per_token_ms_mean": round(float(ms.mean()), 4),
            "per_token_ms_p50": round(float(np.percentile(ms, 50)), 4),
            "per_token_ms_p99": round(float(np.percentile(ms, 99)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--answers", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps(measure(args.vocab, args.answers), indent=2))


if __name__ == "__main__":
    main()

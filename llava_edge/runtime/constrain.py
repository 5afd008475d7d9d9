"""Structured answers: JSON-schema constrained decoding through llguidance.

Why a library and why this one: a grammar engine that is right for every schema and every tokenizer is
a project of its own. llguidance compiles a JSON schema to a grammar, reads our `tokenizers` JSON
directly (no transformers, no torch) and computes the set of allowed next tokens in microseconds, so a
sequence carries one matcher and each decode step masks its own logits row before its own sampler
draws. Greedy decoding under a schema is therefore argmax over the allowed tokens: when the model's own
choice is allowed it is kept, and a schema that admits the unconstrained answer does not change it.

The tokenizer must say how its tokens map to bytes (byte-level BPE, or byte-fallback SentencePiece as
in LLaVA's LLaMA/Vicuna/Mistral tokenizers). A word-level tokenizer with no decoder (the shipped demo
model's) cannot, and is refused with one line. An answer cut by ``max_tokens`` is incomplete JSON: give
the schema room.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..errors import UsageError

_LL_TOKENIZERS: dict[int, Any] = {}  # id(Tokenizer) -> (Tokenizer, LLTokenizer): building one costs ~ms..1s


# json.dumps's separators and no other whitespace: a weak model cannot spend its tokens on blank space
# (a schema's own "x-guidance" options override these)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(UsageError):
    """A schema llguidance cannot compile, or a tokenizer it cannot read."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError('JSON-schema answers need llguidance: pip install "llava-edge[structured]"') from None
    return llguidance


def ll_tokenizer(tokenizer: Tokenizer, eos_ids: frozenset[int] | set[int] | list[int]) -> Any:
    """llguidance's view of our tokenizer (cached per tokenizer object)."""
    hit = _LL_TOKENIZERS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    llg = _llguidance()
    eos = sorted(eos_ids)
    try:
        lt = llg.LLTokenizer(tokenizer.to_str(), eos_token=eos or None)
    except ValueError as e:
        raise ConstraintError(f"this model's tokenizer cannot be used for JSON-schema answers ({e}): constrained "
                              "decoding needs a byte-level BPE or byte-fallback tokenizer") from None
    _LL_TOKENIZERS[id(tokenizer)] = (tokenizer, lt)
    return lt


def load_schema(path: str | Path) -> dict[str, Any]:
    """A JSON-schema file for ``--json-schema``; a missing or broken file is a one-line error."""
    p = Path(path)
    try:
        schema = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConstraintError(f"schema file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConstraintError(f"schema file {p} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"schema file {p} must hold a JSON object")
    return schema


class Grammar:
    """A compiled schema, checked once; ``matcher()`` makes one per sequence."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], schema: dict[str, Any] | None):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.lt = ll_tokenizer(tokenizer, eos_ids)
        self.eos = sorted(eos_ids)
        # json_object mode: any JSON object
        try:
            self.grammar = llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                                  defaults=COMPACT)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"unsupported JSON schema: {e}") from None
        err = llg.LLMatcher.validate_grammar(self.grammar, self.lt)
        if err and not err.startswith("WARNING"):
            raise ConstraintError(f"unsupported JSON schema: {err.splitlines()[0]}")
        self._llg = llg

    def matcher(self) -> "Constraint":
        return Constraint(self._llg.LLMatcher(self.lt, self.grammar, log_level=0), self.lt.vocab_size, self.eos)


_LOCK = threading.Lock()
_GRAMMARS: "OrderedDict[tuple[int, str], Grammar]" = OrderedDict()


def cached_grammar(tokenizer: Tokenizer, eos_ids: frozenset[int], schema: dict[str, Any] | None) -> Grammar:
    """A compiled grammar, reused across calls with the same schema (compiling costs ~0.1-0.3 s at a
    32000-token vocabulary: once per schema, not once per frame or request)."""
    key = (id(tokenizer), json.dumps(schema, sort_keys=True))
    with _LOCK:  # the server builds sequences on several threads
        grammar = _GRAMMARS.get(key)
        if grammar is None or grammar.tokenizer is not tokenizer:
            grammar = _GRAMMARS[key] = Grammar(tokenizer, eos_ids, schema)
            while len(_GRAMMARS) > 32:
                _GRAMMARS.popitem(last=False)
        _GRAMMARS.move_to_end(key)
        return grammar


class Constraint:
    """One sequence's grammar state: masks its logits row, then follows the token its sampler drew."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: list[int]):
        self.m = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids

    def mask(self, logits: np.ndarray) -> None:
        """logits [1, V] or [V], in place: tokens the grammar forbids get -inf."""
        row = logits.reshape(-1)
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: min(self.vocab_size, row.size)].astype(bool)
        if not allowed.any():  # only after an error state: end the answer rather than the engine step
            allowed[[t for t in self.eos_ids if t < allowed.size]] = True
        row[: allowed.size][~allowed] = -np.inf
        row[allowed.size :] = -np.inf

    def advance(self, token_id: int) -> None:
        self.m.consume_token(int(token_id))  # a refused token leaves the matcher in its error state

    @property
    def accepting(self) -> bool:
        return bool(self.m.is_accepting())

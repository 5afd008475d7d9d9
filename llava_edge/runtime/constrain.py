"""Structured answers: JSON-schema constrained decoding through llguidance.

Why a library and why this one: a grammar engine that is right for every schema and every tokenizer is
a project of its own. llguidance compiles a JSON schema to a grammar, reads our `tokenizers` JSON
directly (no transformers, no torch) and computes the set of allowed next tokens in microseconds, so a
sequence carries one matcher and each decode step masks its own logits row before its own sampler
draws. Greedy decoding under a schema is therefore argmax over the allowed tokens: when the model's own
choice is allowed it is kept, and a schema that admits the unconstrained answer does not change it.

The tokenizer must say how its tokens map to bytes (byte-level BPE, or byte-fallback SentencePiece as
in LLaVA's LLaMA/Vicuna/Mistral tokenizers). A word-level tokenizer with no decoder cannot, and is
refused with one line. An answer cut by ``max_tokens`` is incomplete JSON: give
the schema room.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..errors import UsageError

log = logging.getLogger("llava_edge.constrain")

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
        log.debug("llguidance refused the tokenizer: %s", e)  # its words name its internals, not the fix
        kind = type(tokenizer.model).__name__ if hasattr(tokenizer, "model") else "this"
        raise ConstraintError(f"this model's tokenizer ({kind}) cannot spell arbitrary JSON, so JSON-schema answers "
                              "are not available for it: they need a byte-level BPE or byte-fallback tokenizer, as "
                              "LLaVA checkpoints have") from None
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


class _Budget(Exception):
    pass


def _resolve(root: Any, ref: str) -> Any:
    """A local ``$ref`` ("#", "#/$defs/a"): the schema it points at; ``_Budget`` for one we cannot follow."""
    if ref == "#" or ref == "#/":
        return root
    if not ref.startswith("#/"):
        raise _Budget  # a remote ref or an anchor: leave it to llguidance
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _Budget
    return node


def admits_finite_value(schema: Any, budget: int = 20000) -> bool:
    """False when no finite JSON value can satisfy ``schema`` because its ``$ref``s recurse without end:
    ``{"$ref": "#"}``, a definition that refers only to itself, an object whose *required* property is
    the object again, an array of at least one item that is the array again. llguidance compiles such a
    schema: the first kind is an empty grammar (the answer ends at once, empty), the others never end
    (the answer runs to max_tokens). Judges only the structure ($ref, allOf/anyOf/oneOf, required
    properties, minItems); anything else, and a schema too large to walk within ``budget`` steps, is
    assumed satisfiable (llguidance judges the rest)."""
    left = [budget]

    def finite(node: Any, refs: frozenset[str]) -> bool:
        left[0] -= 1
        if left[0] < 0:
            raise _Budget
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in refs:  # this path only comes back to where it started
                return False
            if not finite(_resolve(schema, ref), refs | {ref}):
                return False
        subs = node.get("allOf")
        if isinstance(subs, list) and not all(finite(x, refs) for x in subs):
            return False
        for key in ("anyOf", "oneOf"):
            subs = node.get(key)
            if isinstance(subs, list) and subs and not any(finite(x, refs) for x in subs):
                return False
        if "const" in node or "enum" in node:
            return True
        types = node.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types is None or any(t not in ("object", "array") for t in types):
            return True  # an untyped schema, or a scalar type: a scalar value ends
        if "object" in types:
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            required = node.get("required") if isinstance(node.get("required"), list) else []
            if all(finite(props[k], refs) for k in required if isinstance(k, str) and k in props):
                return True
        if "array" in types:
            n = node.get("minItems", 0)
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            items = node.get("items", True)
            need = [prefix[i] if i < len(prefix) else items for i in range(min(n, len(prefix) + 1))] \
                if isinstance(n, int) and n > 0 else []
            if all(finite(x, refs) for x in need):
                return True
        return False

    try:
        return finite(schema, frozenset())
    except (_Budget, RecursionError):
        return True


class Grammar:
    """A compiled schema, checked once; ``matcher()`` makes one per sequence.

    Refused (ConstraintError, the server's 400 ``unsupported_schema``): what llguidance cannot compile,
    and a schema that admits no finite JSON value (``admits_finite_value``) or whose grammar allows no
    first token (it would end every answer at once, empty).
    """

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], schema: dict[str, Any] | None):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.lt = ll_tokenizer(tokenizer, eos_ids)
        self.eos = sorted(eos_ids)
        if schema is not None and not admits_finite_value(schema):
            raise ConstraintError("unsupported JSON schema: no finite JSON value satisfies it (a $ref that "
                                  "recurses without end; make the recursion optional)")
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
        # a grammar with no way to start (e.g. {"$ref": "#"}) compiles, and its matcher stops at once
        probe = self.matcher()
        first = np.unpackbits(np.frombuffer(probe.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        first[[t for t in self.eos if t < first.size]] = 0
        if probe.m.is_error() or probe.m.is_stopped() or not first[: self.lt.vocab_size].any():
            raise ConstraintError("unsupported JSON schema: it allows no answer at all (a $ref that only refers "
                                  "to itself?)")

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

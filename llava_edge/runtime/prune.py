"""Visual-token pruning: fewer image tokens between the projector and the decoder, chosen at run time.

A LLaVA answer on a CPU or an edge GPU is bound by prefill, and most of a prompt is image tokens (576
for LLaVA-1.5, up to 2,880 for a LLaVA-NeXT image). These methods drop a fraction of one image's
projected features before they are placed into the prompt embeddings; the decoder graphs are unchanged
(no re-export), text tokens are never touched, and the kept tokens stay in their original order.

- ``dart`` (DART, Wen et al. 2025, "Stop looking for important tokens"): duplicates carry no new
  information. A few pivot tokens (largest L2 norm) are kept; of the others, those least similar
  (cosine) to every pivot are kept. Training-free, needs only the image's features.
- ``cdpruner`` (CDPruner, Zhang et al. 2025, conditional diversity): the kept set is the greedy MAP of a
  determinantal point process whose kernel is the tokens' cosine similarity weighted by each token's
  relevance to the instruction (mean cosine with the prompt's text embeddings after the image, min-max
  normalised): diverse tokens that matter to the question.

Why a ratio and a deterministic count: ``kept_count(n)`` depends only on the image's token count and
the ratio, so the prompt is laid out with the kept count before anything runs and ``check_context`` stays
the one context check. Kept tokens keep their original positions (``prompt_positions``: the DART
reference; measured worth 1.6-3.9 held-out points over renumbering, docs/pruning.md "Positions"), and the
text after an image stays where it was; the KV cache is still filled densely. A backend whose decoder
derives positions from the cache fill (a fast decoder exported before it took ``position_ids``, the
TensorRT plugin decoder) renumbers instead (``backend.takes_positions``).

Every method has a plain numpy reference (``*_reference``, loops as the papers write them) that the tests
hold the vectorised selection to.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UsageError

PRUNE_HELP = ("Drop this fraction of each image's tokens before the decoder: METHOD:RATIO with METHOD dart "
              "(duplicates of pivot tokens) or cdpruner (diverse and relevant to the question) and RATIO in "
              "[0, 1), e.g. dart:0.5; off (the default) keeps every token.")
DART_PIVOTS = 8  # DART's default number of pivot tokens
_EPS = 1e-6


class PruneMethod(str, enum.Enum):
    DART = "dart"
    CDPRUNER = "cdpruner"


class PruneError(UsageError):
    """A pruning setting that does not exist (unknown method, ratio outside [0, 1))."""


@dataclass(frozen=True)
class PruneSetting:
    """How many of each image's tokens to drop, and which: one value in every verb and the server
    (``--prune dart:0.5``, the request's ``prune`` field). ``method`` None or ``ratio`` 0 is off."""

    method: PruneMethod | None = None
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.method is not None and not isinstance(self.method, PruneMethod):
            object.__setattr__(self, "method", _method(self.method))
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r < 1:
            raise PruneError(f"prune ratio must be a number in [0, 1), not {r!r}")
        object.__setattr__(self, "ratio", float(r))
        if self.method is None and self.ratio:
            raise PruneError("a prune ratio needs a method: dart or cdpruner")

    @classmethod
    def parse(cls, text: "str | PruneSetting | None") -> "PruneSetting":
        """``off``/``none``/empty, or ``METHOD:RATIO`` (``dart:0.5``); a bad value is one PruneError line."""
        if isinstance(text, PruneSetting):
            return text
        if text is None:
            return OFF
        if not isinstance(text, str):
            raise PruneError(f"prune must be text such as dart:0.5, not {type(text).__name__}")
        s = text.strip().lower()
        if s in ("", "off", "none"):
            return OFF
        method, sep, ratio = s.partition(":")
        if not sep:
            raise PruneError(f"prune {text!r}: give METHOD:RATIO, e.g. dart:0.5 (methods: {_names()}), or off")
        try:
            value = float(ratio)
        except ValueError:
            raise PruneError(f"prune {text!r}: the ratio {ratio!r} is not a number in [0, 1)") from None
        return cls(_method(method), value)

    @property
    def active(self) -> bool:
        return self.method is not None and self.ratio > 0

    def __str__(self) -> str:
        return f"{self.method.value}:{self.ratio:g}" if self.active else "off"

    def kept_count(self, n: int) -> int:
        """Tokens kept of an image's ``n``: ``n - floor(n * ratio)`` (at least one of a non-empty image).
        The one definition: prompts are laid out with it before the vision encoder runs."""
        return n - math.floor(n * self.ratio) if self.active else n

    @property
    def needs_instruction(self) -> bool:
        return self.active and self.method is PruneMethod.CDPRUNER

    def cache_tag(self, instruction_ids: np.ndarray | None = None) -> str:
        """What an image's cached features and a prompt's cached KV must also match: the setting, and for a
        question-aware method the instruction (the same frame asked another question keeps other tokens)."""
        if not self.active:
            return ""
        tag = f"|prune={self}"
        if self.needs_instruction:
            ids = np.asarray(instruction_ids if instruction_ids is not None else (), np.int64)
            tag += ":" + hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()
        return tag

    def tagged(self, digests: tuple[str, ...], ids: np.ndarray, image_token_id: int) -> tuple[str, ...]:
        """Each image's content digest + ``cache_tag``: the key the image cache's kept rows and the prefix
        cache use (engine and static batch alike). The instruction is read from ``ids`` only for a
        question-aware method."""
        if not self.active:
            return digests
        tag = self.cache_tag(instruction_ids(ids, image_token_id) if self.needs_instruction else None)
        return tuple(d + tag for d in digests)

    def select(self, features: np.ndarray, instruction: np.ndarray | None = None) -> np.ndarray:
        """Indices (ascending) of the rows of one image's features [n, hidden] to keep."""
        n = features.shape[0]
        k = self.kept_count(n)
        if k >= n:
            return np.arange(n)
        if self.method is PruneMethod.DART:
            return dart_select(features, k)
        return cdpruner_select(features, instruction, k)

    def apply(self, features: np.ndarray, instruction: np.ndarray | None = None) -> np.ndarray:
        """One image's kept features, in their original order."""
        return features[self.select(features, instruction)] if self.active else features


OFF = PruneSetting()


def prompt_positions(ids: np.ndarray, image_token_id: int, full: Sequence[int], counts: Sequence[int],
                     kept: Sequence[np.ndarray | None]) -> np.ndarray:
    """Each prompt token's rotary position when pruned images keep their original positions: its position
    in the unpruned prompt. ``ids`` holds each image's ``counts[i]`` kept tokens in prompt order; ``full[i]``
    is image i's unpruned token count and ``kept[i]`` the ascending indices (into its unpruned tokens) of
    the ones kept. Text tokens sit where they were before pruning: every earlier image's dropped tokens
    still count. The last position + 1 is where decoding continues.

    ``kept[i]`` None: image i's selection is not known here because a reused prefix covers all of its
    tokens (their KV is cached already and nothing reads their positions); they get -1, every other
    token's position is exact (it depends only on the counts)."""
    ids = np.asarray(ids)
    if not len(full) == len(counts) == len(kept):
        raise ValueError(f"{len(full)} image counts, {len(counts)} kept counts, {len(kept)} selections")
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != sum(counts):
        raise ValueError(f"the prompt has {len(where)} image tokens, its images keep {sum(counts)}")
    pos = np.empty(len(ids), np.int64)
    cursor, j, shift = 0, 0, 0  # next token to place; image tokens of earlier images; what they dropped
    for i, (n, size, k) in enumerate(zip(full, counts, kept)):
        if not size:
            continue
        start = int(where[j])
        if int(where[j + size - 1]) != start + size - 1:
            raise ValueError(f"image {i}'s {size} tokens are not consecutive in the prompt")
        pos[cursor:start] = np.arange(cursor, start) + shift  # the text before it
        if k is None:
            pos[start : start + size] = -1
        else:
            k = np.asarray(k, np.int64)
            if len(k) != size or int(k[-1]) >= n or (np.diff(k) <= 0).any():
                raise ValueError(f"image {i}: {len(k)} kept indices are not {size} ascending ones below {n}")
            pos[start : start + size] = start + shift + k
        shift += n - size
        cursor, j = start + size, j + size
    pos[cursor:] = np.arange(cursor, len(ids)) + shift
    return pos


def instruction_ids(ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """The prompt's text after its last image token: what a question-aware method reads as the instruction
    (LLaVA templates put the question, then the assistant prefix, after the image)."""
    ids = np.asarray(ids)
    where = np.flatnonzero(ids == image_token_id)
    return ids[where[-1] + 1 :] if where.size else ids[:0]


def _names() -> str:
    return ", ".join(m.value for m in PruneMethod)


def _method(name: str) -> PruneMethod:
    try:
        return PruneMethod(str(name).strip().lower())
    except ValueError:
        raise PruneError(f"unknown prune method {name!r}; use {_names()}") from None


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


# -- DART ---------------------------------------------------------------------------------------------
def dart_select(features: np.ndarray, k: int, pivots: int = DART_PIVOTS) -> np.ndarray:
    """DART: the ``pivots`` largest-norm tokens, then the ``k - pivots`` others whose largest cosine
    similarity to any pivot is smallest (ties: the earlier token). Ascending indices."""
    x = np.asarray(features, np.float64)
    p = min(pivots, k)
    piv = np.argsort(-np.linalg.norm(x, axis=-1), kind="stable")[:p]
    u = _unit(x)
    dup = (u @ u[piv].T).max(axis=1)
    dup[piv] = np.inf
    rest = np.argsort(dup, kind="stable")[: k - p]
    out = np.sort(np.concatenate([piv, rest]))
    return out


def dart_reference(features: np.ndarray, k: int, pivots: int = DART_PIVOTS) -> list[int]:
    """DART written out token by token (the test's reference for ``dart_select``)."""
    rows = [np.asarray(r, np.float64) for r in features]
    norms = [float(np.sqrt(sum(v * v for v in r))) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-norms[i], i))
    piv = order[: min(pivots, k)]

    def cos(a: int, b: int) -> float:
        return float(np.dot(rows[a], rows[b])) / (max(norms[a], _EPS) * max(norms[b], _EPS))

    others = [i for i in range(len(rows)) if i not in piv]
    score = {i: max(cos(i, j) for j in piv) for i in others}
    rest = sorted(others, key=lambda i: (score[i], i))[: k - len(piv)]
    return sorted(piv + rest)


# -- CDPruner ---------------------------------------------------------------------------------------------
def relevance(features: np.ndarray, instruction: np.ndarray | None) -> np.ndarray:
    """Each token's relevance to the instruction: mean cosine with its text embeddings, min-max scaled to
    [0, 1]; all ones without an instruction (then the kernel is plain diversity)."""
    n = features.shape[0]
    if instruction is None or len(instruction) == 0:
        return np.ones(n)
    r = (_unit(features) @ _unit(instruction).T).mean(axis=1)
    span = r.max() - r.min()
    return (r - r.min()) / span if span > _EPS else np.ones(n)


def cdpruner_kernel(features: np.ndarray, instruction: np.ndarray | None) -> np.ndarray:
    """L = diag(q) S diag(q): S the tokens' cosine similarity, q their relevance (floored so that no token's
    gain is exactly zero)."""
    u = _unit(features)
    q = relevance(features, instruction) + _EPS
    return q[:, None] * (u @ u.T) * q[None, :]


def cdpruner_select(features: np.ndarray, instruction: np.ndarray | None, k: int) -> np.ndarray:
    """Greedy MAP of the DPP with kernel ``cdpruner_kernel`` (Chen et al. 2018's incremental Cholesky, O(n k)
    a step): each step adds the token whose conditional variance (the gain in log det) is largest. Once
    the kernel's rank is spent (duplicated tokens), the rest are filled by relevance. Ascending indices."""
    kern = cdpruner_kernel(features, instruction)
    n = kern.shape[0]
    cis = np.zeros((k, n))
    d2 = np.diag(kern).copy()
    chosen: list[int] = []
    free = np.ones(n, bool)
    for it in range(k):
        gains = np.where(free, d2, -np.inf)
        j = int(np.argmax(gains))
        if gains[j] <= 1e-10:
            break
        chosen.append(j)
        free[j] = False
        e = (kern[j] - cis[:it, j] @ cis[:it]) / math.sqrt(d2[j])
        cis[it] = e
        d2 = d2 - e * e
    if len(chosen) < k:  # numerically no gain left: most relevant first, earlier first on ties
        q = np.diag(kern)
        rest = [i for i in np.lexsort((np.arange(n), -q)) if free[i]]
        chosen += rest[: k - len(chosen)]
    return np.sort(np.asarray(chosen, np.int64))


def cdpruner_reference(features: np.ndarray, instruction: np.ndarray | None, k: int) -> list[int]:
    """The greedy DPP MAP by definition: add the token that maximises det(L[S, S]) (the test's reference
    for ``cdpruner_select``; cubic per candidate, for small inputs only)."""
    kern = cdpruner_kernel(features, instruction)
    chosen: list[int] = []
    for _ in range(k):
        best, best_det = None, 1e-10 * (np.linalg.det(kern[np.ix_(chosen, chosen)]) if chosen else 1.0)
        for i in range(kern.shape[0]):
            if i in chosen:
                continue
            s = chosen + [i]
            det = np.linalg.det(kern[np.ix_(s, s)])
            if det > best_det:
                best, best_det = i, det
        if best is None:
            break
        chosen.append(best)
    q = np.diag(kern)
    rest = sorted((i for i in range(kern.shape[0]) if i not in chosen), key=lambda i: (-q[i], i))
    return sorted(chosen + rest[: k - len(chosen)])

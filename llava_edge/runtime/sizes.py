"""Sizes on the command line: '10MB', '40M', '512KiB' or a plain integer, read the same by every verb
(``run --max-image-pixels``, ``serve --max-image-bytes``, a Ray config's ``max_prompt_bytes``).

Here, not in serve/, because the runtime's verbs take sizes too and the runtime never imports serve.
"""

from __future__ import annotations

import re

from ..errors import UsageError

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?\s*")


def parse_size(text: str | int, what: str) -> int:
    """'10MB', '40M', '512KiB', '2000000' -> an integer count (decimal units unless 'i' is given); an int
    passes as it is. Anything else is a UsageError naming ``what`` (the flag)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise UsageError(f"{what}: cannot read {text!r} as a size (e.g. 10MB, 40M, 2000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def format_size(n: int, unit: str = "") -> str:
    """The shortest exact spelling parse_size reads back: 10_000_000 -> '10M' (+ unit: '10MB'),
    262_144 -> '256Ki' (+ unit: '256KiB'), 1_234 -> '1234'."""
    for suffix, scale in (("G", 10**9), ("Gi", 2**30), ("M", 10**6), ("Mi", 2**20), ("K", 10**3), ("Ki", 2**10)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}{unit}"
    return str(n)

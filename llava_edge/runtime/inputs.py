"""Checks on the text a caller hands the runtime: prompts, chat lines, stop strings.

Why here and not in the tokenizer: `tokenizers` fails on bytes or on the lone surrogates Python makes
of invalid UTF-8 in argv or stdin ("TextInputSequence must be str"), which says nothing to a user. One
function is shared by the CLI, the chat loop and the Python API, so all three say the same thing.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from ..errors import TextInputError, UsageError


def check_text(value: Any, what: str = "prompt", allow_empty: bool = False) -> str:
    """`value` as a str, or a TextInputError naming the first bad byte. Bytes are decoded as UTF-8;
    str from argv/stdin carries invalid bytes as surrogates (surrogateescape), caught here too."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextInputError(f"{what} is not valid UTF-8 "
                                 f"(byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if not isinstance(value, str):
        raise TextInputError(f"{what} must be text, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what_char = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise TextInputError(f"{what} is not valid UTF-8 ({what_char} at character {e.start})") from None
    if not allow_empty and not value.strip():
        raise TextInputError(f"{what} is empty")
    return value


def check_stop(stop: Sequence[str]) -> list[str]:
    """Stop strings: each non-empty text (an empty one would stop after the first token)."""
    if isinstance(stop, (str, bytes)):
        stop = [stop]
    return [check_text(s, "stop string") for s in stop]


MAX_THREADS = 4096


def check_threads(threads: int | None) -> int | None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise UsageError(f"threads must be an integer from 1 to {MAX_THREADS}, not {threads!r}")
    return threads


def check_count(value: Any, what: str) -> int:
    """A positive integer such as max_new_tokens."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{what} must be an integer >= 1, not {value!r}")
    return int(value)

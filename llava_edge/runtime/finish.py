"""Why a sequence ended: one enum for the engine, the pipeline, the CLI and the server.

Its own module, stdlib only, so the server's protocol table (serve/protocol.py ``FINISH``) and the Ray
router can name it without importing numpy or the tokenizer.
"""

from __future__ import annotations

import enum

__all__ = ["FinishReason"]


class FinishReason(str, enum.Enum):
    """Why a sequence ended. str-valued: compares, hashes, prints and serializes as its value ("eos")."""

    EOS = "eos"  # an end-of-sequence token (kept in the ids)
    STOP = "stop"  # a stop string (cut from the text)
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the caller cancelled it
    ERROR = "error"  # the backend or admission failed (Sequence.error says why)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{reason}" is the value on every Python version

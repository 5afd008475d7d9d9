"""The package's tokenizer.json, loaded so that a broken or hostile one is one PackageError line.

tokenizer.json is more than a word list: its normalizer, pre-tokenizer and decoder may carry regexes,
which the `tokenizers` library runs with oniguruma, a backtracking engine. A catastrophic pattern
(``(a+)+$``) either panics inside Rust when it exceeds oniguruma's retry limit (a PanicException, which
is not even an ``Exception``) or takes seconds to minutes per prompt. Its ids must also fit the model:
an id the embedding table has no row for fails inside onnxruntime, and an end-of-sequence id the
tokenizer does not know is never decoded.

So before the runtime uses a tokenizer: its size is bounded, a load failure becomes one line, the ids
the manifest names must be the tokenizer's (the image token's id included), no id may be past the
embedding table, and a few adversarial texts are encoded and decoded on a worker thread under a time
limit. The probe catches patterns that blow up on long runs of one character class; a pattern crafted
to blow up only on some rare input is not caught here (that needs a regex engine without backtracking).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .package import TOKENIZER_NAME, Manifest, PackageError

__all__ = ["load_tokenizer", "MAX_TOKENIZER_BYTES", "PROBE_TIMEOUT_S"]

MAX_TOKENIZER_BYTES = 64 << 20  # the largest real ones (Gemma's 256k vocabulary) are ~33 MB
PROBE_TIMEOUT_S = 2.0  # a sound tokenizer encodes the probes in milliseconds
# long runs of one character class, each ended by a character that makes a `(x+)+$`-style pattern fail
PROBES = ("a" * 2000 + "!", "a " * 1000 + "!", "0" * 2000 + "!", " " * 2000 + "!", "\u00e9" * 2000 + "!",
          "aA0_" * 500 + "!", "\n" * 2000 + "!", "<image>" * 300 + "!")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(package_dir: str | os.PathLike, manifest: Manifest) -> Tokenizer:
    """The package's tokenizer, checked against `manifest`; a PackageError naming the package if it
    cannot be loaded, does not fit the model, or is too slow on the probe texts."""
    path = Path(package_dir) / TOKENIZER_NAME
    where = f"package {package_dir}: {TOKENIZER_NAME}"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise PackageError(f"{where} cannot be read: {e.strerror or e}") from None
    if size > MAX_TOKENIZER_BYTES:
        raise PackageError(f"{where} is {size:,} bytes, over the limit of {MAX_TOKENIZER_BYTES:,}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a bare Exception for a file it cannot parse, a PanicException
        raise PackageError(f"cannot load {TOKENIZER_NAME} of {package_dir}: {_first_line(e)}") from None
    _check_ids(tokenizer, manifest, where)
    _probe(tokenizer, where)
    return tokenizer


def _check_ids(tokenizer: Tokenizer, manifest: Manifest, where: str) -> None:
    """Every id the manifest names is the tokenizer's, and every id the tokenizer can produce has a row
    in the embedding table (vocab_size rows, or up to the image token's in the original layout)."""
    t = manifest.text
    named = {"text.bos_token_id": [t.bos_token_id], "text.eos_token_ids": t.eos_token_ids,
             "text.pad_token_id": [t.pad_token_id]}
    for field, ids in named.items():
        for i in ids:
            if i is not None and tokenizer.id_to_token(i) is None:
                raise PackageError(f"{where} has no token {i}, which manifest field {field} names; the tokenizer "
                                   "does not belong to this model")
    if tokenizer.token_to_id(t.image_token) != t.image_token_id:
        raise PackageError(f"{where} maps the image token {t.image_token!r} to {tokenizer.token_to_id(t.image_token)}, "
                           f"but manifest field text.image_token_id is {t.image_token_id}")
    rows = max(t.vocab_size, t.image_token_id + 1)
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= rows:
        raise PackageError(f"{where} has token id {top}, past the model's {rows} embedding rows "
                           "(text.vocab_size); the tokenizer does not belong to this model")


def _probe(tokenizer: Tokenizer, where: str) -> None:
    """Encode and decode the probe texts on a daemon thread, waiting at most PROBE_TIMEOUT_S.

    The batch calls release the GIL (plain `encode` holds it, so a stuck call could not be timed out);
    a probe still running is left behind on its daemon thread, and the package is refused."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            encodings = tokenizer.encode_batch(list(PROBES))
            tokenizer.decode_batch([e.ids for e in encodings])
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - a PanicException must not escape a thread unreported
            outcome["error"] = e

    worker = threading.Thread(target=work, name="tokenizer-probe", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S)
    if "error" in outcome:
        raise PackageError(f"{where} fails on a probe text: {_first_line(outcome['error'])}") from None
    if not outcome.get("ok"):
        raise PackageError(f"{where} takes over {PROBE_TIMEOUT_S:g} s to encode a few 2000-character probe texts "
                           "(a catastrophic regex in its normalizer or pre-tokenizer?); refusing it")

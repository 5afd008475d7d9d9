"""Options defined once: a dataclass field that is also a command-line flag.

``option()`` puts a flag's help text, bounds and check on the field, beside its default; ``settings_of``
reads a dataclass's option fields back as ``Setting`` rows. From those rows cli.py writes a verb's flags
(``_with_settings``) and ``check_fields`` validates an instance, so a flag's name, type, default, help and
check are written once. ``ServeConfig`` and ``RayOptions`` (serve/settings.py) and ``QuantizeOptions``
(quantize/options.py) are defined this way.

Why a package-level module: each options dataclass lives in its stage, stages may not import each other
(docs/architecture.md), and the CLI reads them at start-up, so the mechanism imports nothing but errors.
"""

from __future__ import annotations

import enum
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import UsageError

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it ("must be 4 or 8, not 3"), or None


def option(default: Any, help: str, *, kind: str | None = None, flag: str | None = None, lo: float | None = None,
           hi: float = math.inf, check: Check | None = None, ray: bool = True, envvar: str | None = None,
           unit: str = "") -> Any:
    """A dataclass field that is also a command-line option. ``help``: the flag's help text; ``kind``: only
    ``"size"`` (an int read as 10MB/40M/2000000) differs from what the annotation says; ``flag``: the flag
    when it is not ``--field-name`` (a repeatable list's singular); ``lo``/``hi``: the range ``check_fields``
    checks; ``check``: any other rule, given a set value, returning the complaint that follows the flag in the
    error; ``ray``: whether ``serve --ray`` forwards it (False: a setting of our own HTTP front, which Ray
    replaces with its proxy); ``unit``: how a size's default is written in --help (B for bytes)."""
    return field(default=default, metadata={"help": help, "kind": kind, "flag": flag, "lo": lo, "hi": hi,
                                            "check": check, "ray": ray, "envvar": envvar, "unit": unit})


@dataclass(frozen=True)
class Setting:
    """One option field, as the CLI and Ray see it."""

    name: str  # the field (and Ray argument) name
    flag: str  # --max-image-bytes
    kind: str  # str, int, float, bool, path, size, list or enum
    default: Any
    help: str
    optional: bool  # None is allowed (and the default means "not set")
    lo: float | None
    hi: float
    ray: bool
    envvar: str | None
    unit: str
    check: Check | None = None
    choices: type[enum.Enum] | None = None  # kind "enum": the enum whose values the flag takes


_KINDS = {str: "str", int: "int", float: "float", bool: "bool", Path: "path", tuple: "list"}


def _kind(cls: type, name: str, hint: Any) -> tuple[str, bool, type[enum.Enum] | None]:
    """'int | None' -> ('int', True, None); 'tuple[str, ...]' -> ('list', False, None); 'Method' -> ('enum',
    False, Method). A string annotation is read in the module of the class that declares the field (a
    subclass elsewhere inherits it), not with get_type_hints, which would also read fields that are no options
    and may name what their module imports only for type checking (ServeConfig.limits)."""
    if isinstance(hint, str):
        owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        hint = eval(hint, vars(sys.modules[owner.__module__]))  # noqa: S307 - our own annotations
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    args = typing.get_args(hint) if union else (hint,)
    real = [a for a in args if a is not type(None)]
    base = typing.get_origin(real[0]) or real[0]
    optional = len(real) < len(args)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return "enum", optional, base
    return _KINDS[base], optional, None


@functools.cache  # the fields never change; RayOptions reads its own on every construction
def settings_of(cls: type) -> tuple[Setting, ...]:
    """``cls``'s option fields (those made with ``option()``), in declaration order (the order of --help)."""
    out = []
    for f in fields(cls):
        m = f.metadata
        if "help" not in m:
            continue
        kind, optional, choices = _kind(cls, f.name, f.type)
        out.append(Setting(f.name, m["flag"] or "--" + f.name.replace("_", "-"), m["kind"] or kind, f.default,
                           m["help"], optional, m["lo"], m["hi"], m["ray"], m["envvar"], m["unit"], m["check"],
                           choices))
    return tuple(out)


def _at_least(value: float | None, flag: str, low: float, high: float = math.inf) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, not {value}")
    if not low <= value <= high:
        bound = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise UsageError(f"{flag} must be {bound}, not {value:g}")


def check_fields(obj: object, settings: tuple[Setting, ...]) -> None:
    """The ranges (``lo``/``hi``) and checks the option fields declare, on the values ``obj`` holds; the
    first failure is one UsageError naming the field's flag. A value of None (not set) is not checked."""
    for s in settings:
        value = getattr(obj, s.name)
        if s.lo is not None:
            _at_least(value, s.flag, s.lo, s.hi)
        if s.check is not None and value is not None and (complaint := s.check(value)):
            raise UsageError(f"{s.flag} {complaint}")


def at_most(high: int) -> Check:
    """A check for an upper bound alone, worded as the CLI's other verbs word theirs ("must be at most N")."""
    return lambda value: None if value <= high else f"must be at most {high}, not {value}"

"""The model package: one directory, one manifest, everything the runtime needs.

Every stage (export, quantize, build) reads a package and writes a new one. The manifest is the
contract between stages, so it is versioned and checked against the files on load: a package that
was half-written, hand-edited or produced by a newer llava-edge is refused with a message that says
why, instead of failing later inside onnxruntime.

This module imports neither torch nor transformers: the runtime uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from .errors import LlavaEdgeError, OutputError, Terminated

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
# What later stages add beside the manifest's files (quantization report, TensorRT engines): still ours.
PACKAGE_EXTRAS = frozenset({"quantization_report.json", "engines"})
# Packages up to this size are re-hashed on every load (0.2 s for 256 MiB here); larger ones only on
# `inspect --verify`, and a graph onnxruntime cannot parse is named when the backend opens it.
VERIFY_ON_LOAD_BYTES = 256 << 20
# Staging and swap-out directories carry the pid of the process that made them: `.NAME.partial-PID-xxxx`.
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-")

# -- manifest schema bounds: far above any real model, far below what would exhaust memory ------------
MAX_MANIFEST_BYTES = 16 << 20  # an anyres image_newline of 16k floats is ~350 KB
DTYPES = ("float32", "float16")  # manifest.dtype: what `export --dtype` writes
# graph input/output dtypes: the numpy names of ONNX's tensor types that export and the fast decoder write
TENSOR_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                           "uint64", "uint32", "uint16", "uint8", "bool"})
MAX_IMAGE_TOKENS = 65536  # per image (per tile for anyres); LLaVA-1.5 has 576, SigLIP-384 729
MAX_CONTEXT = 1 << 21  # positions; each KV slot is allocated up to this
MAX_VOCAB = 1 << 24
MAX_HIDDEN = 1 << 17
MAX_LAYERS = MAX_HEADS = MAX_HEAD_DIM = 4096
MAX_IMAGE_SIDE = 4096  # pixels: the tower's square, the resize target, an anyres pinpoint side
_DIGEST = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable, one line: it may be named in an error
_REQUIRED = object()

logger = logging.getLogger("llava_edge")


class PackageError(LlavaEdgeError):
    """A model package is missing, incomplete or from an incompatible version."""


# -- manifest schema ---------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A manifest value as the JSON file spells it, cut short: 1e9 reads 1000000000.0, True reads true."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(cls: type) -> tuple[set[str], set[str]]:
    """A dataclass's (all, required) field names: the keys its manifest object may and must have."""
    all_ = {f.name for f in fields(cls)}
    return all_, {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}


class _Fields:
    """One object of a manifest, read field by field: each value is checked as it is taken, and an error
    names it by its dotted path (``text.num_kv_heads``) and the package. A hand-edited or hostile
    manifest is then refused at load with the field to fix, instead of failing later inside numpy or
    onnxruntime, or allocating until killed (``num_image_tokens: 1e9``)."""

    def __init__(self, value: Any, path: str, where: str = "", cls: type | None = None):
        self.path, self.where = path, where
        if not isinstance(value, dict):
            raise PackageError(f"{where}manifest field {path} must be a JSON object, not {_show(value)}")
        self.d = value
        if cls is not None:
            known, required = _names(cls)
            for key in [*sorted(required - set(value)), *sorted(set(value) - known)]:
                state = "is missing" if key in required else "is not one this llava-edge knows"
                raise PackageError(f"{where}manifest field {self.name(key)} {state}")

    def name(self, key: str) -> str:
        """The field's dotted path; a key that is not a plain word is quoted (it may hold a newline)."""
        if not key:
            return self.path
        key = key if re.fullmatch(r"[\w.\-\[\]]+", key) else json.dumps(key)
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, what: str, value: Any) -> PackageError:
        return PackageError(f"{self.where}manifest field {self.name(key)} {what}, not {_show(value)}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.d:
            return self.d[key]
        if default is _REQUIRED:
            raise PackageError(f"{self.where}manifest field {self.name(key)} is missing")
        return default

    def integer(self, key: str, lo: int, hi: int, above: str | None = None, value: Any = _REQUIRED) -> int:
        """An integer in [lo, hi]; a bool or a float (1e9) is refused, not truncated. `above` words hi."""
        value = self.get(key) if value is _REQUIRED else value
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer from {lo} to {hi}")
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.error(key, f"must be {kind}", value)
        if value > hi:
            raise self.error(key, f"must be {above or f'at most {hi}'}", value)
        return value

    def number(self, key: str, positive: bool = False, finite: bool = True, default: Any = _REQUIRED,
               value: Any = _REQUIRED) -> float | None:
        """A real number (int or float, never a bool); None where the default is None."""
        value = self.get(key, default) if value is _REQUIRED else value
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (finite and not math.isfinite(value)) or (positive and not value > 0):
            raise self.error(key, "must be a " + ("positive " if positive else "finite " if finite else "") + "number",
                             value)
        return value

    def numbers(self, key: str, n: int, positive: bool = False) -> list[float]:
        value = self.items(key, n, n)
        return [self.number(f"{key}[{i}]", positive, value=x) for i, x in enumerate(value)]

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false", value)
        return value

    def string(self, key: str, choices: Iterable[str] | None = None, default: Any = _REQUIRED) -> str:
        value = self.get(key, default)
        choices = tuple(choices) if choices is not None else None
        if choices is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}", value)
        if not isinstance(value, str) or not value or len(value) > 4096:
            raise self.error(key, "must be a non-empty string", value)
        return value

    def items(self, key: str, lo: int, hi: int, default: Any = _REQUIRED) -> list[Any]:
        value = self.get(key, default)
        size = f"{lo}" if lo == hi else f"{lo} to {hi}"
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of {size} items", value)
        if not lo <= len(value) <= hi:
            raise PackageError(f"{self.where}manifest field {self.name(key)} must be a list of {size} items, not "
                               f"{len(value)}")
        return value

    def obj(self, key: str, default: Any = _REQUIRED) -> dict[str, Any] | None:
        value = self.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, "must be a JSON object", value)
        return value

    def relpath(self, key: str, value: Any = _REQUIRED) -> str:
        """A file of the package: relative, no `..`, no control characters. Where it leads (symlinks) and
        what it is (FIFO, device) is checked against the disk by load_manifest."""
        value = self.get(key) if value is _REQUIRED else value
        if not _is_relpath(value):
            raise self.error(key, "must be a relative path inside the package (no '..', not absolute)", value)
        return value


def _is_relpath(value: Any) -> bool:
    if not isinstance(value, str) or not value or len(value) > 1024 or re.search(r"[\x00-\x1f\x7f\\]", value):
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and path.parts not in ((), (".",))


@dataclass
class TensorSpec:
    """One graph input or output. Symbolic dims are strings ("batch", "past_len")."""

    name: str
    dtype: str
    shape: list[int | str]

    @staticmethod
    def from_dict(d: Any, path: str = "tensor", where: str = "") -> "TensorSpec":
        f = _Fields(d, path, where, TensorSpec)
        shape = f.items("shape", 0, 16)
        for i, dim in enumerate(shape):  # a size, or a symbolic name ("batch")
            if not (isinstance(dim, str) and 0 < len(dim) <= 256):
                f.integer(f"shape[{i}]", 0, 2**31 - 1, value=dim)
        return TensorSpec(f.string("name"), f.string("dtype", sorted(TENSOR_DTYPES)), shape)


@dataclass
class GraphSpec:
    """One ONNX graph of the package: its file (relative to the package) and its signature."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[str] = field(default_factory=list)
    size_bytes: int = 0
    max_abs_error: float | None = None  # vs PyTorch on random inputs, measured at export

    @staticmethod
    def from_dict(d: Any, path: str = "graph", where: str = "") -> "GraphSpec":
        f = _Fields(d, path, where, GraphSpec)
        tensors = {k: [TensorSpec.from_dict(t, f.name(f"{k}[{i}]"), where) for i, t in enumerate(f.items(k, 0, 4096))]
                   for k in ("inputs", "outputs")}
        data = f.items("external_data", 0, 64, default=[])
        return GraphSpec(
            file=f.relpath("file"), inputs=tensors["inputs"], outputs=tensors["outputs"],
            external_data=[f.relpath(f"external_data[{i}]", rel) for i, rel in enumerate(data)],
            size_bytes=f.integer("size_bytes", 0, 1 << 50) if "size_bytes" in f.d else 0,
            max_abs_error=f.number("max_abs_error", finite=False, default=None),
        )


@dataclass
class TextConfig:
    """What the runtime must know about the language model to drive the decoder graph."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int
    image_token: str
    image_token_id: int
    chat_template: str  # a name from llava_edge.runtime.prompt.TEMPLATES

    @staticmethod
    def from_dict(d: Any, where: str = "") -> "TextConfig":
        f = _Fields(d, "text", where, TextConfig)
        heads = f.integer("num_heads", 1, MAX_HEADS)
        kv_heads = f.integer("num_kv_heads", 1, heads, f"at most text.num_heads ({heads})")
        if heads % kv_heads:
            raise f.error("num_kv_heads", f"must divide text.num_heads ({heads})", kv_heads)
        vocab = f.integer("vocab_size", 1, MAX_VOCAB)
        image_id = f.integer("image_token_id", 0, MAX_VOCAB)
        # the decoder emits ids below vocab_size only: an end-of-sequence id past it would never stop a
        # generation. The embedding table may be longer: the original layout gives <image> a row past it.
        below_vocab = f"below text.vocab_size ({vocab})"
        eos = [f.integer(f"eos_token_ids[{i}]", 0, vocab - 1, below_vocab, value=e)
               for i, e in enumerate(f.items("eos_token_ids", 1, 64))]
        rows = max(vocab, image_id + 1)
        in_table = f"below the embedding table's {rows} rows"
        bos = None if f.get("bos_token_id") is None else f.integer("bos_token_id", 0, rows - 1, in_table)
        return TextConfig(
            hidden_size=f.integer("hidden_size", 1, MAX_HIDDEN), num_layers=f.integer("num_layers", 1, MAX_LAYERS),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=f.integer("head_dim", 1, MAX_HEAD_DIM),
            vocab_size=vocab, max_context=f.integer("max_context", 1, MAX_CONTEXT), bos_token_id=bos,
            eos_token_ids=eos, pad_token_id=f.integer("pad_token_id", 0, rows - 1, in_table),
            image_token=f.string("image_token"), image_token_id=image_id, chat_template=f.string("chat_template"),
        )


@dataclass
class VisionConfig:
    """Image preprocessing settings, copied from the checkpoint's processor, and the feature shape."""

    image_size: int  # the square the tower sees (crop size)
    patch_size: int
    shortest_edge: int  # resize target for the shorter side
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    resample: int  # PIL resampling filter id (3 = bicubic)
    do_center_crop: bool
    pad_to_square: bool  # LLaVA-1.5 "pad" aspect ratio: pad with the mean colour first
    num_image_tokens: int  # features per image after the select strategy (per tile for anyres)
    vision_feature_layer: int | list[int]
    select_strategy: str  # "default" drops CLS, "full" keeps it
    resize: str = "shortest_edge"  # CLIP: short side then centre crop; "square": straight to SxS (SigLIP)
    # LLaVA-NeXT anyres: {"grid_pinpoints": [[h, w], ...], "image_newline": [hidden floats]}; None otherwise
    anyres: dict[str, Any] | None = None

    @staticmethod
    def from_dict(d: Any, hidden_size: int, where: str = "") -> "VisionConfig":
        f = _Fields(d, "vision", where, VisionConfig)
        size = f.integer("image_size", 1, MAX_IMAGE_SIDE)
        return VisionConfig(
            image_size=size, patch_size=f.integer("patch_size", 1, size, f"at most vision.image_size ({size})"),
            shortest_edge=f.integer("shortest_edge", 1, MAX_IMAGE_SIDE),
            image_mean=f.numbers("image_mean", 3), image_std=f.numbers("image_std", 3, positive=True),
            rescale_factor=f.number("rescale_factor", positive=True),
            resample=f.integer("resample", 0, 5),  # PIL's filters: NEAREST 0 ... HAMMING 5
            do_center_crop=f.flag("do_center_crop"), pad_to_square=f.flag("pad_to_square"),
            num_image_tokens=f.integer("num_image_tokens", 1, MAX_IMAGE_TOKENS),
            vision_feature_layer=_feature_layer(f), select_strategy=f.string("select_strategy", ("default", "full")),
            resize=f.string("resize", ("shortest_edge", "square"), default="shortest_edge"),
            anyres=_anyres(f, hidden_size),
        )


def _feature_layer(f: _Fields) -> int | list[int]:
    """An index into the tower's hidden states (negative from the end), or a list of them."""
    value = f.get("vision_feature_layer")
    if isinstance(value, list):
        return [f.integer(f"vision_feature_layer[{i}]", -MAX_LAYERS, MAX_LAYERS, value=x)
                for i, x in enumerate(f.items("vision_feature_layer", 1, 64))]
    return f.integer("vision_feature_layer", -MAX_LAYERS, MAX_LAYERS)


def _anyres(f: _Fields, hidden_size: int) -> dict[str, Any] | None:
    """LLaVA-NeXT's tiling: pinpoints bound the canvas an image is resized onto (so its pixels), and the
    newline vector is added to hidden states, so it has exactly hidden_size finite entries."""
    value = f.obj("anyres", default=None)
    if value is None:
        return None
    a = _Fields(value, f.name("anyres"), f.where)
    for i, pin in enumerate(a.items("grid_pinpoints", 1, 1024)):
        if not isinstance(pin, list) or len(pin) != 2:
            raise a.error(f"grid_pinpoints[{i}]", "must be a [height, width] pair", pin)
        for j, side in enumerate(pin):
            a.integer(f"grid_pinpoints[{i}][{j}]", 1, MAX_IMAGE_SIDE, value=side)
    a.numbers("image_newline", hidden_size)
    return value


@dataclass
class Manifest:
    format_version: int
    source: dict[str, Any]  # checkpoint path, format ("llava-hf" / "llava-original"), architecture
    dtype: str  # "float32" / "float16": the dtype of the graphs' float inputs and outputs
    text: TextConfig
    vision: VisionConfig
    graphs: dict[str, GraphSpec]  # "vision", "embed", "decoder"
    quantization: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # {"model": "llava"/"llava_next", "decoder": "llama"/"mistral"/"qwen2"/"phi3", "vision": "clip"/"siglip"}
    family: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # file (relative) -> sha256 hex; empty in old packages

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @staticmethod
    def from_dict(d: Any, package: str | os.PathLike | None = None) -> "Manifest":
        """Check the whole schema (types, ranges, file names) and build the manifest; an error names
        the field and, given `package`, the package."""
        where = f"package {package}: " if package is not None else ""
        version = d.get("format_version") if isinstance(d, dict) else None
        if isinstance(version, bool) or not isinstance(version, int):
            raise PackageError(f"{where}manifest.json has no integer format_version; not a llava-edge package")
        if version > FORMAT_VERSION:
            raise PackageError(
                f"package format version {version} is newer than this llava-edge supports "
                f"({FORMAT_VERSION}); upgrade llava-edge or re-export the package"
            )
        f = _Fields(d, "", where)
        f.integer("format_version", 1, FORMAT_VERSION)
        text = TextConfig.from_dict(f.get("text"), where)
        graphs = _Fields(f.get("graphs"), "graphs", where)
        for name in graphs.d:  # named in messages and backends' lookups: one plain word
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise graphs.error("", "must name graphs with letters, digits, '_', '.' and '-'", name)
        return Manifest(
            format_version=version,
            source=f.obj("source"),
            dtype=f.string("dtype", DTYPES),
            text=text,
            vision=VisionConfig.from_dict(f.get("vision"), text.hidden_size, where),
            graphs={name: GraphSpec.from_dict(g, graphs.name(name), where) for name, g in graphs.d.items()},
            quantization=f.obj("quantization", default=None),
            versions=f.obj("versions", default={}),
            extra=f.obj("extra", default={}),
            family=f.obj("family", default={}),
            digests=_digests(f),
        )


def _digests(f: _Fields) -> dict[str, str]:
    digests = f.obj("digests", default={})
    for rel, digest in digests.items():
        if not _is_relpath(rel):
            raise f.error("digests", "must name files by relative paths inside the package (no '..', not "
                          "absolute)", rel)
        # any other string is a digest that never matches: "differs from the sha256", said on verify
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise f.error("digests", f"must map {_show(rel)} to a sha256 hex string", digest)
    return digests


def _package_file(root: Path, rel: str, what: str) -> os.stat_result | None:
    """The stat of `root / rel`, a regular file inside the package, or None when it does not exist.

    Symlinks are followed and must land inside the package: a graph or a digested file linked to
    /etc/passwd is not ours to read, let alone to report as verified. A FIFO, device or directory is
    refused before anything opens it (reading a FIFO blocks forever, a device never ends)."""
    try:
        real = (root / rel).resolve()
        if not real.is_relative_to(root.resolve()):
            raise PackageError(f"package {root}: {what} {rel} leads outside the package (through a symlink); "
                               "a package must hold its own files")
        st = real.stat()
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), EACCES
        raise PackageError(f"package {root}: cannot open {what} {rel}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise PackageError(f"package {root}: {what} {rel} is {kind}, not a regular file")
    return st


def _check_files(root: Path, manifest: Manifest) -> int:
    """Every file the manifest names is a regular file inside the package, with the recorded sizes;
    returns the bytes the digests cover."""
    if _package_file(root, TOKENIZER_NAME, "tokenizer") is None:
        raise PackageError(f"package {root} is incomplete: missing {TOKENIZER_NAME}")
    for name, graph in manifest.graphs.items():
        actual = 0
        for rel in [graph.file, *graph.external_data]:
            st = _package_file(root, rel, f"graph '{name}' file")
            if st is None:
                raise PackageError(f"package {root} is incomplete: graph '{name}' needs missing file {rel}")
            actual += st.st_size
        if graph.size_bytes and actual != graph.size_bytes:
            raise PackageError(
                f"package {root}: graph '{name}' is {actual} bytes on disk but the manifest "
                f"recorded {graph.size_bytes}; the package is corrupt or was modified"
            )
    total = 0
    for rel in manifest.digests:
        st = _package_file(root, rel, "digested file")
        if st is None:
            raise PackageError(f"package {root} is incomplete: its manifest records a digest for missing file {rel}")
        total += st.st_size
    return total


def _read_manifest(root: Path) -> Any:
    """manifest.json's JSON, read only once it is known to be a regular file of the package of sane size."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{root} is not a llava-edge model package: no {MANIFEST_NAME}")
    if _package_file(root, MANIFEST_NAME, "manifest").st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"package {root}: {MANIFEST_NAME} is over {MAX_MANIFEST_BYTES >> 20} MiB; not a "
                           "llava-edge manifest")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSONDecodeError, a 5000-digit int
        raise PackageError(f"{path} is not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def load_manifest(package_dir: str | os.PathLike, check_files: bool = True, verify: bool | None = None) -> Manifest:
    """Read and validate a package's manifest: its schema always (Manifest.from_dict); with check_files,
    every file it names must be a regular file inside the package with the recorded size (catches
    truncated copies, half-written packages and names that lead out of it), and its content must match
    the recorded sha256 when `verify` (None: when the package is at most VERIFY_ON_LOAD_BYTES)."""
    root = Path(package_dir)
    if not root.is_dir():
        raise PackageError(f"model package not found: {root} is not a directory")
    data = _read_manifest(root)
    if not isinstance(data, dict):
        raise PackageError(f"{root / MANIFEST_NAME} is not a llava-edge manifest (a JSON {type(data).__name__}, "
                           "not an object)")
    manifest = Manifest.from_dict(data, root)
    if check_files:
        total = _check_files(root, manifest)
        if manifest.digests and (verify or (verify is None and total <= VERIFY_ON_LOAD_BYTES)):
            for rel, digest in manifest.digests.items():
                if file_sha256(root / rel) != digest:
                    raise PackageError(f"package {root}: {rel} differs from the sha256 recorded in its manifest; the "
                                       "package is corrupt or was modified: copy or export it again")
    return manifest


def require_portable_decoder(package_dir: str | os.PathLike, manifest: Manifest, command: str) -> None:
    """quantize and build start from the portable decoder; a `--target cpu`/`cpu-int4` package has
    none. One line that says so and how to get a package that has it."""
    if "decoder" in manifest.graphs:
        return
    source = manifest.source.get("path") or "CHECKPOINT"
    raise PackageError(f"`llava-edge {command}` starts from the portable decoder, which {package_dir} (exported "
                       f"with --target {manifest.extra.get('target', '?')}) does not hold; export one with "
                       f"`llava-edge export {source} -o NEW_PKG`")


def graph_size(root: Path, graph: GraphSpec) -> int:
    return sum((root / rel).stat().st_size for rel in [graph.file, *graph.external_data])


def package_files(manifest: Manifest) -> list[str]:
    """Every file the manifest names (relative paths): the tokenizer and each graph with its data."""
    files = [TOKENIZER_NAME]
    for graph in manifest.graphs.values():
        files += [f for f in [graph.file, *graph.external_data] if f not in files]
    return files


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(package_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record sizes and sha256 digests, then write manifest.json.

    A digest already in the manifest is kept for a file last modified before the manifest.json now in
    the directory (a file copied with its times from a source package, or one an earlier stage wrote);
    every other file is hashed once here, right after the stage wrote it (still in the page cache).
    """
    root = Path(package_dir)
    for graph in manifest.graphs.values():
        graph.size_bytes = graph_size(root, graph)
    previous = root / MANIFEST_NAME
    written_at = previous.stat().st_mtime_ns if previous.is_file() else -1
    digests = {}
    for rel in package_files(manifest):
        known = manifest.digests.get(rel)
        digests[rel] = known if known and (root / rel).stat().st_mtime_ns < written_at else file_sha256(root / rel)
    manifest.digests = digests
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.to_json())
    tmp.replace(previous)


def verify_package(package_dir: str | os.PathLike) -> tuple[Manifest, list[str]]:
    """Re-hash every file the manifest records a digest for; returns the manifest and the files whose
    content differs (empty when intact). A manifest without digests (an older llava-edge) has none.
    An intact package's tokenizer is then loaded and probed as the runtime would (a PackageError if it
    is broken or hostile), so `inspect --verify` vouches for what `run` will read."""
    root = Path(package_dir)
    manifest = load_manifest(root, verify=False)
    bad = [rel for rel, digest in manifest.digests.items() if file_sha256(root / rel) != digest]
    if not bad:
        from .tokenizer_check import load_tokenizer  # it imports this module

        load_tokenizer(root, manifest)
    return manifest, bad


# -- safe outputs ------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, before any work, if `path` (a file or directory to create) cannot be created: its
    nearest existing ancestor must be a directory we can create files in (probed, not os.access,
    which says yes to root on a read-only mount)."""
    path = Path(path).absolute()
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"cannot create {path}: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {base}: {e.strerror or e}") from None


def check_output_file(path: str | os.PathLike) -> Path:
    """An output file (eval -o, bench -o): not a directory, and creatable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    check_writable(path)
    return path


def _foreign(root: Path) -> list[str] | None:
    """Names in `root` that a llava-edge package there does not account for; None when `root` holds
    no package we wrote (no manifest, or one that does not parse)."""
    try:
        manifest = load_manifest(root, check_files=False)
    except PackageError:
        return None
    ours = {MANIFEST_NAME, *PACKAGE_EXTRAS, *(Path(f).parts[0] for f in package_files(manifest))}
    return sorted(p.name for p in root.iterdir() if p.name not in ours)


def check_output_dir(target: str | os.PathLike, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output directory that must not be replaced or cannot be written.

    Without overwrite only a missing or empty directory is accepted. With overwrite, only a directory
    holding a llava-edge package and nothing else, and never one of `protect` (the inputs), a
    directory above one of them, the current directory or one above it.
    """
    target = Path(target).resolve()
    for p in protect:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise OutputError(f"refusing to write {target}: it is (or holds) the input {p}; choose another output")
    cwd = Path.cwd().resolve()
    if overwrite and (target == cwd or target in cwd.parents):
        raise OutputError(f"refusing to replace {target}: it is the current directory or one above it")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if not overwrite:
                raise OutputError(f"output directory {target} exists and is not empty (use --overwrite to replace "
                                  "a llava-edge package there)")
            foreign = _foreign(target)
            if foreign is None:
                raise OutputError(f"refusing to overwrite {target}: it is not a llava-edge package")
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise OutputError(f"refusing to overwrite {target}: besides a llava-edge package it holds {shown}")
    check_writable(target)
    return target


# -- staging -----------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove staging (`.NAME.partial-PID-*`) and swap-out (`.NAME.old-PID-*`) directories whose process
    is gone (killed mid-stage), saying so; returns what was removed. A live process's are kept."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _STAGING.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.warning("removed %s, left by an interrupted llava-edge (process %d, no longer running)", p, pid)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) where the program is, so the
    same cleanup as Ctrl-C runs. Only from the main thread, and only if nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_package(target: str | os.PathLike, overwrite: bool = False,
                   protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    `target` is checked first (see check_output_dir: only a package of ours is ever replaced, never an
    input in `protect`) and again just before the swap. On any exception (Ctrl-C, and SIGTERM, included)
    the staging directory is deleted, so an interrupted stage never leaves something that loads as a
    package; one left by a killed process (SIGKILL, power loss) is removed by the next stage here.
    """
    protect = list(protect)
    target = check_output_dir(target, overwrite, protect)
    clean_stale_staging(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-{os.getpid()}-"
    with sigterm_as_interrupt():
        try:
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a package is an ordinary directory
            yield staging
            check_output_dir(target, overwrite, protect)  # something may have appeared there meanwhile
            replace_dir(staging, target)
        except BaseException:
            # by name, not by variable: a signal may land between mkdtemp and the assignment
            for p in target.parent.iterdir():
                if p.name.startswith(prefix):
                    shutil.rmtree(p, ignore_errors=True)
            raise


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for a few renames, then deliver them to the handlers in place before.
    Main thread only (the only one Python runs signal handlers in)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python; leave it alone
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` in place of `target` by renames; the old one is removed only once the new
    one is in, and Ctrl-C or SIGTERM wait for the renames, so no moment leaves neither."""
    with signals_deferred():
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
            target.rename(old)
            new.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            new.rename(target)

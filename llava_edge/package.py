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
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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

logger = logging.getLogger("llava_edge")


class PackageError(LlavaEdgeError):
    """A model package is missing, incomplete or from an incompatible version."""


@dataclass
class TensorSpec:
    """One graph input or output. Symbolic dims are strings ("batch", "past_len")."""

    name: str
    dtype: str
    shape: list[int | str]


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
    def from_dict(d: dict[str, Any]) -> "GraphSpec":
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        return GraphSpec(**d)


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
    def from_dict(d: dict[str, Any]) -> "Manifest":
        version = d.get("format_version")
        if not isinstance(version, int):
            raise PackageError("manifest.json has no integer format_version; not a llava-edge package")
        if version > FORMAT_VERSION:
            raise PackageError(
                f"package format version {version} is newer than this llava-edge supports "
                f"({FORMAT_VERSION}); upgrade llava-edge or re-export the package"
            )
        try:
            return Manifest(
                format_version=version,
                source=d["source"],
                dtype=d["dtype"],
                text=TextConfig(**d["text"]),
                vision=VisionConfig(**d["vision"]),
                graphs={k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()},
                quantization=d.get("quantization"),
                versions=d.get("versions", {}),
                extra=d.get("extra", {}),
                family=d.get("family", {}),
                digests=d.get("digests", {}),
            )
        except (KeyError, TypeError) as e:
            raise PackageError(f"manifest.json is malformed: {e}") from e


def load_manifest(package_dir: str | os.PathLike, check_files: bool = True, verify: bool | None = None) -> Manifest:
    """Read and validate a package's manifest; with check_files, every file it names must exist
    with the recorded size (catches truncated copies and half-written packages), and its content must
    match the recorded sha256 when `verify` (None: when the package is at most VERIFY_ON_LOAD_BYTES)."""
    root = Path(package_dir)
    if not root.is_dir():
        raise PackageError(f"model package not found: {root} is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{root} is not a llava-edge model package: no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path} is not a llava-edge manifest (a JSON {type(data).__name__}, not an object)")
    manifest = Manifest.from_dict(data)
    if check_files:
        if not (root / TOKENIZER_NAME).is_file():
            raise PackageError(f"package {root} is incomplete: missing {TOKENIZER_NAME}")
        for name, graph in manifest.graphs.items():
            for rel in [graph.file, *graph.external_data]:
                if not (root / rel).is_file():
                    raise PackageError(f"package {root} is incomplete: graph '{name}' needs missing file {rel}")
            if graph.size_bytes:
                actual = sum((root / rel).stat().st_size for rel in [graph.file, *graph.external_data])
                if actual != graph.size_bytes:
                    raise PackageError(
                        f"package {root}: graph '{name}' is {actual} bytes on disk but the manifest "
                        f"recorded {graph.size_bytes}; the package is corrupt or was modified"
                    )
        total = sum((root / rel).stat().st_size for rel in manifest.digests if (root / rel).is_file())
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
    content differs (empty when intact). A manifest without digests (an older llava-edge) has none."""
    root = Path(package_dir)
    manifest = load_manifest(root, verify=False)
    bad = [rel for rel, digest in manifest.digests.items() if file_sha256(root / rel) != digest]
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

"""The model package: one directory, one manifest, everything the runtime needs.

Every stage (export, quantize, build) reads a package and writes a new one. The manifest is the
contract between stages, so it is versioned and checked against the files on load: a package that
was half-written, hand-edited or produced by a newer llava-edge is refused with a message that says
why, instead of failing later inside onnxruntime.

This module imports neither torch nor transformers: the runtime uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import LlavaEdgeError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"


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
            )
        except (KeyError, TypeError) as e:
            raise PackageError(f"manifest.json is malformed: {e}") from e


def load_manifest(package_dir: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate a package's manifest; with check_files, every file it names must exist
    with the recorded size (catches truncated copies and half-written packages)."""
    root = Path(package_dir)
    if not root.is_dir():
        raise PackageError(f"model package not found: {root} is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{root} is not a llava-edge model package: no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} is not valid JSON: {e}") from e
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
    return manifest


def graph_size(root: Path, graph: GraphSpec) -> int:
    return sum((root / rel).stat().st_size for rel in [graph.file, *graph.external_data])


def write_manifest(package_dir: str | os.PathLike, manifest: Manifest) -> None:
    root = Path(package_dir)
    for graph in manifest.graphs.values():
        graph.size_bytes = graph_size(root, graph)
    (root / MANIFEST_NAME).write_text(manifest.to_json())


@contextlib.contextmanager
def staged_package(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    On any exception (Ctrl-C included) the staging directory is deleted, so an interrupted stage
    never leaves something that loads as a package.
    """
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        if any(target.iterdir()):
            raise PackageError(f"output directory {target} exists and is not empty (use --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a package is an ordinary directory
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` in place of `target` by renames; the old one is removed only once the new
    one is in, so no moment leaves neither."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)

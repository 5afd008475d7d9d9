"""`llava-edge demo`: the whole path on a model that needs no download; and the built-in model's
package that `llava-edge serve` with no PACKAGE serves.

With the trained tiny LLaVA asset (llava_edge/assets/tiny_llava) the answers mean something; without
it the demo falls back to a random-weight checkpoint built on the spot, which shows the machinery
(export, verification, streaming, timings) but answers gibberish, and says so.

The served package lives in ``$LLAVA_EDGE_CACHE`` (else ``$XDG_CACHE_HOME/llava-edge``, else
``~/.cache/llava-edge``) under ``builtin-<digest>``, the digest covering the asset's files and the
llava-edge version, so a new release or a retrained asset gets a new directory. It is written through
``package.staged_package`` (an interrupted export leaves no half package), reused while its manifest
loads with every file it names, and rebuilt when it does not. A directory at that path that is not a
llava-edge package is never removed: it is refused, by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageDraw
from rich.console import Console

from . import __version__
from .errors import OutputError, UsageError
from .package import PackageError, load_manifest

ASSET = Path(__file__).parent / "assets" / "tiny_llava"
SERVE_LINE = "serve it: llava-edge serve   then open http://127.0.0.1:8000/"


def _scene(size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.ellipse((8, 30, 40, 62), fill=(220, 30, 30))
    d.rectangle((56, 30, 88, 62), fill=(30, 60, 220))
    return img


def _trained_scenes():
    try:
        from .synthetic.evaluate import demo_scenes
    except ImportError:
        return None
    return demo_scenes()


def run_demo(workdir: Path, max_new_tokens: int = 16, console: Console | None = None) -> None:
    from .export.exporter import export_package
    from .runtime.pipeline import Pipeline

    console = console or Console()
    workdir.mkdir(parents=True, exist_ok=True)
    trained = (ASSET / "config.json").is_file()
    t0 = time.perf_counter()
    if trained:
        checkpoint = ASSET
        console.print(f"[bold]1. checkpoint[/]: the trained tiny LLaVA shipped with llava-edge ({checkpoint})")
    else:
        from .export.factory import build_checkpoint

        checkpoint = workdir / "checkpoint"
        build_checkpoint(checkpoint, "llava-hf-v1.5")
        console.print(f"[bold]1. checkpoint[/]: random-weight tiny LLaVA-1.5 written to {checkpoint} "
                      "(no trained asset installed: answers will be gibberish)")
    package = workdir / "package"
    result = export_package(checkpoint, package, overwrite=True)
    errs = ", ".join(f"{k} {v:.1e}" for k, v in result.errors.items())
    console.print(f"[bold]2. export[/]: vision/embed/decoder ONNX in {package}; max |onnx - torch| {errs}")

    pipe = Pipeline.from_package(package)
    console.print(f"[bold]3. runtime[/]: onnxruntime, no torch; {pipe.manifest.vision.num_image_tokens} image "
                  f"tokens per image, template {pipe.template}")
    scenes = _trained_scenes() if trained else None
    if not scenes:
        scenes = [(_scene(), ["What is in the picture?", "What colour is the circle?"], [None, None])]
    right = total = 0
    for n, (image, questions, answers) in enumerate(scenes):
        path = workdir / f"scene{n}.png"
        image.save(path)
        console.print(f"\n[bold]image[/] {path}")
        for q, expected in zip(questions, answers):
            res = pipe.generate(image, q, max_new_tokens=max_new_tokens)
            mark = ""
            if expected is not None:
                ok = res.text.strip().lower() == str(expected).lower()
                right += ok
                total += 1
                mark = " [green]✓[/]" if ok else f" [red]✗ (expected {expected})[/]"
            console.print(f"  Q: {q}\n  A: {res.text!r}{mark}  [dim]({res.timings.prefill_ms:.0f} ms to first token, "
                          f"{res.timings.tokens_per_s:.0f} tok/s)[/]")
    if total:
        console.print(f"\n{right}/{total} answers match the scene generator's ground truth")
    console.print(f"\n[green]demo done[/] in {time.perf_counter() - t0:.1f} s")
    if trained:  # the same model behind the kiosk page (`serve` with no PACKAGE serves the built-in one)
        console.print(SERVE_LINE, markup=False, highlight=False, soft_wrap=True)


# -- the built-in model served: `llava-edge serve` with no PACKAGE ------------------------------------
CACHE_ENV = "LLAVA_EDGE_CACHE"
FAST_DECODER = "decoder_fast"  # what the built-in package must hold (export --fast): KV slots


def cache_root() -> Path:
    """Where cached packages go: $LLAVA_EDGE_CACHE, $XDG_CACHE_HOME/llava-edge or ~/.cache/llava-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "llava-edge"


def asset_digest(asset: Path | None = None) -> str:
    """sha256 (first 16 hex digits) over the asset's file names and bytes and the llava-edge version."""
    asset = asset or ASSET
    h = hashlib.sha256(f"llava-edge {__version__}\n".encode())
    for path in sorted(p for p in asset.rglob("*") if p.is_file()):
        h.update(path.relative_to(asset).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def builtin_dir(asset: Path | None = None) -> Path:
    return cache_root() / f"builtin-{asset_digest(asset)}"


def _usable(pkg: Path) -> bool:
    """The cached package loads (manifest, every file at its recorded size and digest) and has the fast
    decoder. Anything else is rebuilt (or refused, when it is not a package of ours)."""
    try:
        return FAST_DECODER in load_manifest(pkg).graphs
    except (PackageError, OSError):
        return False


def _export(asset: Path, dest: Path) -> None:
    """The built-in package into `dest` (an empty staging directory): portable + fast decoder, as
    `llava-edge export ASSET -o DEST --fast`."""
    from .export.exporter import export_package
    from .export.fast_decoder import export_fast_decoder

    export_package(asset, dest, overwrite=True)
    export_fast_decoder(asset, dest)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One exporter at a time per cache directory (two `serve` started together export once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the staged rename still keeps the package whole
        yield
        return
    with open(root / ".builtin.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def builtin_package(say: Callable[[str], None] = print) -> Path:
    """The built-in model's package with the fast decoder, exported into the cache on first use.

    Raises UsageError when the asset is not installed or the export extra (torch) is missing, and
    OutputError when the cache path is taken by something that is not a llava-edge package."""
    asset = ASSET
    if not (asset / "config.json").is_file():
        raise UsageError(f"the built-in model is not installed ({asset} has no config.json); give a PACKAGE")
    target = builtin_dir(asset)
    if _usable(target):
        return target
    try:
        os.fsencode(target.absolute()).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise UsageError(f"cache directory {target!r} is not valid UTF-8; set {CACHE_ENV} to another directory") \
            from None
    try:
        import torch  # noqa: F401

        from .export import exporter  # noqa: F401
    except ImportError as e:
        raise UsageError(f"serving the built-in model exports it once, which needs the export extra: pip install "
                         f"'llava-edge[export]' (missing: {e.name or e}), or give a PACKAGE") from None
    from .package import check_output_dir, staged_package

    def in_the_way() -> None:  # only a llava-edge package there is ever replaced (staged_package's rule too)
        try:
            check_output_dir(target, overwrite=True)
        except OutputError as e:
            raise OutputError(f"{e} (the built-in model's cache); it is left alone: move it, set {CACHE_ENV} to "
                              "another directory, or give a PACKAGE") from None

    in_the_way()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        if _usable(target):  # another process exported it while this one waited
            return target
        in_the_way()
        what = "re-exporting the built-in model (its cached copy does not load)" if target.exists() else \
            "exporting the built-in model once"
        say(f"{what} into {target} (about 20 s, once; later starts reuse it) ...")
        with staged_package(target, overwrite=True) as staging:
            _export(asset, staging)
    if not _usable(target):  # pragma: no cover - the export verified every graph
        raise OutputError(f"the built-in package in {target} does not load after export")
    return target

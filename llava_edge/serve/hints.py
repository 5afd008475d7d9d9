"""One-line hints the server's start prints (the CLI prints them before the server starts)."""

from __future__ import annotations

from pathlib import Path

from ..package import PackageError, load_manifest


def slots_hint(package: Path, backend: str = "auto") -> str | None:
    """One line for a package served one request at a time because it has no fast decoder (the
    portable `ort` backend has no KV slots: no continuous batching); None otherwise."""
    from ..runtime.backends import resolve_auto

    try:
        manifest = load_manifest(package, check_files=False)
    except (PackageError, OSError):
        return None  # the server's own load reports it
    chosen = resolve_auto(package, manifest) if backend == "auto" else backend
    if chosen != "ort":
        return None
    fast = [g for g in manifest.graphs if g.startswith("decoder_fast")]
    if fast:
        return (f"--backend ort serves one request at a time (1 slot); this package's fast decoder "
                f"({fast[0]}) has slots: --backend auto")
    source = manifest.source.get("path") or "CHECKPOINT"
    return (f"{package} has no fast decoder, so it serves one request at a time (1 slot); for --max-slots "
            f"concurrent requests add one: `llava-edge export {source} -o {package} --fast --overwrite` "
            "(or --target cpu-int4)")

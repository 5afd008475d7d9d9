"""Tiny checkpoints of each LLaVA family (factory presets), exported once per run, with their fast
decoder, and transformers' greedy reference for the prompts the tests ask."""

from __future__ import annotations

import pytest

# the families without NeXT (tests/families/test_next.py): Mistral (BakLLaVA), Phi-3, Qwen2 + SigLIP
# (LLaVA-Interleave). The "llava-qwen2" preset (Qwen2 behind CLIP) adds nothing these do not test.
FAMILIES = ["llava-mistral", "llava-phi3", "llava-interleave"]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, dict]:
    """preset -> {"checkpoint", "package", "model", "spec"}; built lazily, once each."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, dict] = {}

    class Lazy(dict):
        def __missing__(self, preset: str) -> dict:
            from llava_edge.export.exporter import export_package
            from llava_edge.export.factory import build_checkpoint
            from llava_edge.export.fast_decoder import export_fast_decoder

            ckpt, pkg = root / preset / "checkpoint", root / preset / "package"
            model, spec = build_checkpoint(ckpt, preset)
            export_package(ckpt, pkg)
            export_fast_decoder(ckpt, pkg)  # through the loader, as `export --fast` does (Phi-3 unfused)
            self[preset] = {"checkpoint": ckpt, "package": pkg, "model": model, "spec": spec}
            return self[preset]

    return Lazy(cache)

"""The package's shape: one error base the CLI maps, one definition of each contract name, one int4
packer, and an import graph without circles in which build/ never reaches the runtime's CUDA code."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.errors import LlavaEdgeError, UsageError

PKG = Path(__file__).resolve().parents[1] / "llava_edge"
USER_ERRORS = [
    "llava_edge.package:PackageError", "llava_edge.runtime.preprocess:ImageError",
    "llava_edge.runtime.backend:BackendError", "llava_edge.trt_env:TensorRTUnavailable",
    "llava_edge.contract:EngineMismatchError", "llava_edge.export.checkpoint:CheckpointError",
    "llava_edge.export.exporter:ExportError", "llava_edge.quantize.quantize:QuantizeError",
    "llava_edge.quantize.data:CalibrationDataError", "llava_edge.quantize.gptq_import:GPTQImportError",
    "llava_edge.trt.plan:EngineBuildError", "llava_edge.benchmarks.harness:BenchmarkError",
    "llava_edge.runtime.pipeline:PromptTooLongError",
]


@pytest.mark.parametrize("path", USER_ERRORS)
def test_user_errors_share_one_base(path):
    module, name = path.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, LlavaEdgeError) and issubclass(cls, ValueError)


def test_cli_maps_any_llava_edge_error_to_one_line(tiny_models):
    """A BenchmarkError (a module the CLI never imported up front) still becomes one `error:` line."""
    r = CliRunner().invoke(app, ["bench", str(tiny_models["llava-hf-v1.5"]["package"]), "--backend", "ort-magic"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert [line for line in r.output.splitlines() if line.startswith("error:")] == [
        "error: unknown backend 'ort-magic'; use ort, ort-fast, ort-fast-int4, tensorrt"]
    assert issubclass(UsageError, LlavaEdgeError)


def _sources() -> dict[str, str]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p.read_text()
    return out


def test_contract_names_and_the_int4_packer_are_defined_once():
    src = _sources()
    for value in ('"in-place"', '"ping-pong"', "PREFILL_PROFILE, DECODE_PROFILE = 0, 1"):
        owners = [m for m, s in src.items() if any(line.split("#")[0].strip().endswith(value) and "=" in line
                                                     for line in s.splitlines())]
        assert owners == ["llava_edge.contract"], (value, owners)
    nibble_packers = [m for m, s in src.items() if "<< 4)" in s]
    assert nibble_packers == ["llava_edge.packing"]
    tables = [m for m, s in src.items() if "BACKENDS" in s and ("BACKENDS =" in s or "BACKENDS: " in s)]
    assert tables == ["llava_edge.runtime.backends"]


def _top_level_imports(src: dict[str, str]) -> dict[str, set[str]]:
    """Module -> llava_edge modules it imports at import time (not inside functions)."""
    edges: dict[str, set[str]] = {}
    for name, text in src.items():
        pkg = name if name.count(".") == 0 or (PKG.parent / (name.replace(".", "/") + "/__init__.py")).is_file() \
            else name.rsplit(".", 1)[0]
        for node in ast.parse(text).body:
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges.setdefault(name, set()).update(t for t in targets if t in src and t != name)
    return edges


def test_no_import_circles_and_build_stays_off_the_runtime_cuda_code():
    src = _sources()
    edges = _top_level_imports(src)
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in edges.get(n, ()):
            assert state.get(m) != 1, f"import circle: {' -> '.join(stack[stack.index(m):] + [m])}"
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in src:
        if n not in state:
            visit(n, [n])
    cuda = ("trt_backend", "trt_memory", "trt_cuda_graph", "trt_kv", "kv_inplace", "kv_pingpong", "kv_plugin")
    for name, text in src.items():  # lazy imports included
        if name.startswith("llava_edge.trt"):
            assert not any(f"runtime.{c}" in text or f"runtime import {c}" in text for c in cuda), name
        if name.startswith("llava_edge.runtime"):
            assert "llava_edge.trt" not in text and "..trt" not in text, name

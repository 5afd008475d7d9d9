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
    "llava_edge.errors:BackendError", "llava_edge.runtime.backend:BackendError",
    "llava_edge.trt_env:TensorRTUnavailable",
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
        "error: unknown backend 'ort-magic'; use ort, ort-fast, ort-fast-int4, ort-fast-ov, ort-fast-int4-ov, "
        "tensorrt"]
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
    ir = [m for m, s in src.items() for node in ast.parse(s).body if isinstance(node, (ast.Assign, ast.AnnAssign))
          and any(getattr(t, "id", None) == "MAX_IR_VERSION"
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert ir == ["llava_edge.onnx_io"], ir


# -- layering ----------------------------------------------------------------------------------------
# Every top-level unit of llava_edge/ (a stage folder or a module) and what it may import. A new one must
# be placed here and in docs/architecture.md's table.
NEUTRAL = {"__init__", "errors", "contract", "trt_env", "package", "tokenizer_check", "onnx_io", "packing",
           "anyres_grid", "io_safe", "progress", "options"}
STAGES = {"export", "quantize", "trt", "kernels", "runtime", "serve", "watch", "benchmarks", "synthetic"}
ENTRY = {"cli", "demo"}
ALLOWED = {  # lazy (in-function) imports count: they are still a dependency
    **{n: set() for n in NEUTRAL},
    "runtime": set(),
    "serve": {"runtime"},
    "watch": {"runtime"},
    "kernels": set(),
    "trt": {"kernels"},  # only to AOT-compile the Triton kernels into plugins
    "export": {"runtime"},  # the fast decoder is checked through the runtime's backend; chat templates
    "quantize": {"export", "runtime", "synthetic"},  # loads the checkpoint; calibration prompts and images
    "synthetic": {"runtime"},
    "demo": {"export", "runtime", "synthetic"},
    "benchmarks": STAGES - {"benchmarks", "trt", "kernels", "watch"},
    "cli": (STAGES | ENTRY) - {"cli"},
}
RUNTIME_SIDE = {"runtime", "serve", "watch"}  # what a deployment imports: no torch, no test scaffolding
# Built-in tiny models and trainers: CLI verbs (`demo`, `eval`, `random-checkpoint`) use them, so they stay
# in the package, but nothing on the runtime side may reach them (export/factory.py, synthetic/, arch.py).
SCAFFOLDING = {"export", "synthetic", "benchmarks", "demo"}


def _unit(module: str) -> str:
    """llava_edge.runtime.engine -> runtime; llava_edge.errors -> errors; llava_edge -> __init__."""
    return module.split(".")[1] if "." in module else "__init__"


def _imports(src: dict[str, str], lazy: bool) -> dict[str, set[str]]:
    """Module -> the llava_edge modules it imports (`lazy`: anywhere in the file, else at import time)."""
    edges: dict[str, set[str]] = {}
    for name, text in src.items():
        pkg = name if (PKG.parent / (name.replace(".", "/") + "/__init__.py")).is_file() else name.rsplit(".", 1)[0]
        tree = ast.parse(text)
        for node in (ast.walk(tree) if lazy else tree.body):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges.setdefault(name, set()).update(t for t in targets if t in src and t != name)
    return edges


def _unit_edges(src: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    """(unit, unit it imports) -> the modules that do it, lazy imports included."""
    out: dict[tuple[str, str], list[str]] = {}
    for name, targets in _imports(src, lazy=True).items():
        for t in targets:
            if _unit(t) != _unit(name):
                out.setdefault((_unit(name), _unit(t)), []).append(f"{name} -> {t}")
    return out


def _circle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m, stack + [m])):
                return found
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n, [n])):
            return found
    return None


def test_every_top_level_unit_has_a_place_in_the_layering():
    units = {_unit(m) for m in _sources()}
    assert units - NEUTRAL - STAGES - ENTRY == set(), "place it in ALLOWED and docs/architecture.md"
    assert set(ALLOWED) == NEUTRAL | STAGES | ENTRY


def test_the_layering_keeps_the_documented_rules():
    """The table above cannot quietly loosen the rules docs/architecture.md states."""
    for side in RUNTIME_SIDE:  # the runtime side imports neither the build stages nor scaffolding
        assert not ALLOWED[side] & ({"export", "quantize", "trt", "kernels"} | SCAFFOLDING), side
    assert "runtime" not in ALLOWED["trt"] and "trt" not in ALLOWED["runtime"]  # never each other
    assert all(not ALLOWED[n] for n in NEUTRAL)  # contract, trt_env, errors, ...: no stage
    assert _circle({a: set(b) for a, b in ALLOWED.items()}) is None
    assert not any("cli" in ALLOWED[u] for u in ALLOWED)


def test_units_import_only_what_the_layering_allows():
    """Package level, lazy imports included: runtime/serve/watch import no export, quantize, trt, kernels
    or scaffolding; trt and runtime never each other; contract, trt_env, errors, ... no stage."""
    bad = {edge: mods for edge, mods in _unit_edges(_sources()).items()
           if edge[1] not in NEUTRAL and edge[1] not in ALLOWED.get(edge[0], set())}
    assert not bad, "\n".join(f"{a} may not import {b}: {', '.join(m)}" for (a, b), m in sorted(bad.items()))


def test_no_import_circles_between_stages_or_modules():
    src = _sources()
    units: dict[str, set[str]] = {}
    for a, b in _unit_edges(src):  # stages and entry points (package.py's lazy tokenizer_check is a module matter)
        if a not in NEUTRAL and b not in NEUTRAL:
            units.setdefault(a, set()).add(b)
    assert _circle(units) is None, f"import circle between stages: {' -> '.join(_circle(units))}"
    modules = _imports(src, lazy=False)
    assert _circle(modules) is None, f"import circle: {' -> '.join(_circle(modules))}"


def test_trt_and_runtime_do_not_name_each_other():
    """Also through strings (importlib, monkeypatch targets), which the import graph does not see."""
    for name, text in _sources().items():
        if _unit(name) == "trt":
            assert "llava_edge.runtime" not in text and "..runtime" not in text, name
        if _unit(name) == "runtime":
            assert "llava_edge.trt." not in text and "..trt." not in text and "..trt import" not in text, name

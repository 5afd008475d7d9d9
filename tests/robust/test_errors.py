"""Every bad input in docs/errors.md, one parametrized row each: exit code 2, one `error:` line saying
what to change, no traceback, and nothing of the user's deleted (the --overwrite rows prove the
source checkpoint and a foreign file survive byte for byte)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest

from llava_edge.cli import app

from .conftest import png_bytes, tree_digest


class Ctx:
    """What a row's command line needs, made on first use."""

    def __init__(self, request, tmp_path: Path, monkeypatch):
        self.request, self.tmp, self.monkeypatch = request, tmp_path, monkeypatch

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    @cached_property
    def pkg(self) -> str:
        return str(self.fixture("pkg"))

    @cached_property
    def ck(self) -> Path:
        return self.fixture("checkpoint")

    @cached_property
    def image(self) -> str:
        return str(self.fixture("image_file"))

    @cached_property
    def readonly(self) -> Path:
        return self.fixture("readonly_dir")

    def file(self, name: str, data: bytes) -> str:
        (self.tmp / name).write_bytes(data)
        return str(self.tmp / name)

    def foreign_dir(self) -> Path:
        d = self.tmp / "mine"
        d.mkdir(exist_ok=True)
        (d / "thesis.tex").write_text("years of work")
        return d

    def foreign_package_dir(self) -> Path:
        (self.tmp / "wd" / "package").mkdir(parents=True)
        (self.tmp / "wd" / "package" / "draft.txt").write_text("mine")
        return self.tmp / "wd"

    def package_with_extra(self) -> Path:
        d = self.tmp / "pkg_extra"
        shutil.copytree(self.pkg, d)
        (d / "notes.txt").write_text("mine")
        return d

    def cwd_with_foreign(self) -> str:
        self.foreign_dir()
        self.monkeypatch.chdir(self.tmp / "mine")
        return "."

    def old_package(self, corrupt: bool = False) -> str:
        """A package written before digests existed (no "digests" in its manifest)."""
        d = self.tmp / "old"
        shutil.copytree(self.fixture("corrupt_pkg") if corrupt else self.pkg, d)
        m = json.loads((d / "manifest.json").read_text())
        m.pop("digests", None)
        (d / "manifest.json").write_text(json.dumps(m))
        return str(d)


def _run(c: Ctx, *extra: str) -> list[str]:
    return ["run", c.pkg, "-i", c.image, "-p", "What is it?", "--max-new-tokens", "2", *extra]


@dataclass
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    needle: str  # in the one error line
    protects: Callable[[Ctx], Path] | None = None  # a directory that must survive byte for byte


ROWS = [
    # -- never lose a file -------------------------------------------------------------------------
    Row("export-onto-source", lambda c: ["export", str(c.ck), "-o", str(c.ck), "--overwrite"],
        "it is (or holds) the input", lambda c: c.ck),
    Row("export-onto-parent-of-source", lambda c: ["export", str(c.ck), "-o", str(c.ck.parent), "--overwrite"],
        "it is (or holds) the input", lambda c: c.ck),
    Row("export-onto-cwd", lambda c: ["export", str(c.ck), "-o", c.cwd_with_foreign(), "--overwrite"],
        "current directory", lambda c: c.tmp / "mine"),
    Row("export-onto-foreign-dir", lambda c: ["export", str(c.ck), "-o", str(c.foreign_dir()), "--overwrite"],
        "is not a llava-edge package", lambda c: c.tmp / "mine"),
    Row("export-onto-package-with-other-files",
        lambda c: ["export", str(c.ck), "-o", str(c.package_with_extra()), "--overwrite"],
        "besides a llava-edge package it holds notes.txt", lambda c: c.tmp / "pkg_extra"),
    Row("export-into-non-empty-dir", lambda c: ["export", str(c.ck), "-o", str(c.foreign_dir())],
        "exists and is not empty (use --overwrite", lambda c: c.tmp / "mine"),
    Row("export-into-read-only", lambda c: ["export", str(c.ck), "-o", str(c.readonly / "pkg")], "cannot write to"),
    Row("export-unknown-vision", lambda c: ["export", str(c.ck), "-o", str(c.tmp / "p"), "--vision", "int4"],
        "--vision 'int4': use auto, fp32, int8 or int8-blocked"),
    Row("export-unknown-embed", lambda c: ["export", str(c.ck), "-o", str(c.tmp / "p"), "--embed", "int4"],
        "--embed 'int4': use auto, float or int8"),
    Row("export-int8-embed-portable", lambda c: ["export", str(c.ck), "-o", str(c.tmp / "p"), "--embed", "int8"],
        "--embed int8 is for --target cpu or cpu-int4"),
    Row("export-int8-head-without-fast", lambda c: ["export", str(c.ck), "-o", str(c.tmp / "p"), "--lm-head", "int8"],
        "--lm-head int8 applies to fast decoders"),
    Row("random-checkpoint-into-non-empty-dir", lambda c: ["random-checkpoint", "small-100m", str(c.foreign_dir())],
        "exists and is not empty; random-checkpoint writes only a new or empty directory", lambda c: c.tmp / "mine"),
    Row("random-checkpoint-unknown-arch", lambda c: ["random-checkpoint", "gpt-5", str(c.tmp / "x")],
        "unknown architecture"),
    Row("quantize-onto-its-input", lambda c: ["quantize", c.pkg, "--checkpoint", str(c.ck), "-o", c.pkg,
                                              "--overwrite"], "it is (or holds) the input"),
    Row("quantize-into-read-only", lambda c: ["quantize", c.pkg, "--checkpoint", str(c.ck), "-o",
                                              str(c.readonly / "q")], "cannot write to"),
    Row("quantize-threads-negative", lambda c: ["quantize", c.pkg, "--threads", "-3"], "--threads must be >= 1"),
    Row("eval-into-read-only", lambda c: ["eval", c.pkg, "--n", "1", "-o", str(c.readonly / "r.json")],
        "cannot write to"),
    Row("eval-output-is-a-directory", lambda c: ["eval", c.pkg, "--n", "1", "-o", str(c.tmp)], "is a directory"),
    Row("eval-n-zero", lambda c: ["eval", c.pkg, "--n", "0"], "--n must be >= 1"),
    Row("demo-workdir-read-only", lambda c: ["demo", "--workdir", str(c.readonly / "demo")], "cannot write to"),
    Row("demo-workdir-whose-package-dir-is-foreign", lambda c: ["demo", "--workdir", str(c.foreign_package_dir())],
        "is not a llava-edge package", lambda c: c.tmp / "wd"),
    # -- package integrity ---------------------------------------------------------------------------
    Row("run-corrupt-graph-same-size", lambda c: ["run", str(c.fixture("corrupt_pkg")), "-p", "hi"],
        "decoder.onnx differs from the sha256 recorded in its manifest"),
    Row("run-corrupt-graph-same-size-no-digests", lambda c: ["run", c.old_package(corrupt=True), "-p", "hi"],
        "cannot load decoder.onnx (decoder graph)"),
    Row("inspect-verify-corrupt-graph", lambda c: ["inspect", str(c.fixture("corrupt_pkg")), "--verify"],
        "decoder.onnx differ(s) from the sha256"),
    Row("inspect-missing-package", lambda c: ["inspect", str(c.tmp / "nope")], "model package not found"),
    Row("run-fast-backend-missing-graph", lambda c: _run(c, "--backend", "ort-fast"), "llava-edge export"),
    Row("run-unknown-backend", lambda c: _run(c, "--backend", "vulkan"), "unknown backend"),
    # -- images --------------------------------------------------------------------------------------
    Row("image-decompression-bomb",  # 20000x20000 1-bit, real zero rows: 400M pixels in ~50 KB
        lambda c: _run(c)[:2] + ["-i", c.file("bomb.png", png_bytes(20000, 20000, bytes(2501 * 20000))), "-p", "x"],
        "decompression bomb"),
    Row("image-header-100000-square", lambda c: _run(c)[:2] + ["-i", c.file("h.png", png_bytes(100000, 100000)),
                                                               "-p", "x"], "decompression bomb"),
    Row("image-over-limit", lambda c: _run(c)[:2] + ["-i", c.file("big.png", png_bytes(12000, 12000)), "-p", "x"],
        "(144.0M pixels), over the limit of 40.0M pixels"),
    Row("image-over-custom-limit", lambda c: _run(c, "--max-image-pixels", "100"),
        "(1200 pixels), over the limit of 100 pixels"),
    Row("image-is-a-directory", lambda c: _run(c)[:2] + ["-i", str(c.tmp), "-p", "x"], "is a directory, not an image"),
    Row("image-missing", lambda c: _run(c)[:2] + ["-i", str(c.tmp / "no.jpg"), "-p", "x"], "image not found"),
    Row("image-truncated", lambda c: _run(c)[:2] + ["-i", c.file("t.png", Path(c.image).read_bytes()[:80]), "-p", "x"],
        "cannot decode image"),
    Row("image-not-an-image", lambda c: _run(c)[:2] + ["-i", c.file("t.jpg", b"hello"), "-p", "x"],
        "cannot decode image"),
    # -- values ----------------------------------------------------------------------------------------
    Row("prompt-invalid-utf8", lambda c: _run(c)[:4] + ["-p", "caf\udcc3("], "--prompt is not valid UTF-8 (byte 0xc3"),
    Row("prompt-empty", lambda c: _run(c)[:4] + ["-p", "  "], "--prompt is empty"),
    Row("stop-empty", lambda c: _run(c, "--stop", ""), "stop string is empty"),
    Row("temperature-nan", lambda c: _run(c, "--temperature", "nan"), "temperature must be a finite number"),
    Row("temperature-inf", lambda c: _run(c, "--temperature", "inf"), "temperature must be a finite number"),
    Row("temperature-negative", lambda c: _run(c, "--temperature", "-1"), "temperature must be >= 0"),
    Row("top-p-out-of-range", lambda c: _run(c, "--top-p", "1.5"), "top_p must be in (0, 1]"),
    Row("repetition-penalty-nan", lambda c: _run(c, "--repetition-penalty", "nan"), "repetition_penalty must be"),
    Row("max-new-tokens-not-a-number", lambda c: _run(c)[:-2] + ["--max-new-tokens", "abc"],
        "Invalid value for '--max-new-tokens'"),
    Row("max-new-tokens-zero", lambda c: _run(c)[:-2] + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    Row("threads-negative", lambda c: _run(c, "--threads", "-3"), "--threads must be >= 1"),
    Row("unknown-flag", lambda c: _run(c, "--temprature", "1"), "No such option: --temprature"),
    Row("missing-prompt", lambda c: ["run", c.pkg], "Missing option '--prompt'"),
    Row("greedy-and-temperature", lambda c: _run(c, "--greedy", "--temperature", "0.5"), "exclude each other"),
    Row("prompt-beyond-context", lambda c: _run(c)[:4] + ["-p", "hello " * 50, "--max-new-tokens", "200"],
        "exceeds the model's context of 256"),
    Row("bench-batch-not-integers", lambda c: ["bench", c.pkg, "--batch", "1,x"], "comma-separated integers"),
    Row("bench-repeat-zero", lambda c: ["bench", c.pkg, "--repeat", "0"], "--repeat must be >= 1"),
    Row("build-max-batch-zero", lambda c: ["build", c.pkg, "--dry-run", "--max-batch", "0"],
        "--max-batch must be >= 1"),
    Row("build-workspace-nan", lambda c: ["build", c.pkg, "--dry-run", "--workspace-gb", "nan"],
        "--workspace-gb must be a positive number"),
]


def one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line(row: Row, runner, request, tmp_path, monkeypatch):
    c = Ctx(request, tmp_path, monkeypatch)
    argv = row.argv(c)
    protected = row.protects(c) if row.protects else None
    before = tree_digest(protected) if protected else None
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    one_error_line(result)
    assert row.needle in " ".join(result.output.split()), result.output
    if protected:
        assert tree_digest(protected) == before  # byte for byte
    assert not [p for p in tmp_path.rglob(".*partial-*")]  # no staging left behind


def test_old_package_without_digests_still_loads_and_verifies_sizes(runner, request, tmp_path, monkeypatch):
    c = Ctx(request, tmp_path, monkeypatch)
    old = c.old_package()
    r = runner.invoke(app, ["inspect", old, "--verify"])
    assert r.exit_code == 0 and "records no digests" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["run", old, "-p", "hi", "--max-new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output


def test_verify_passes_on_an_intact_package_and_names_the_file(runner, pkg, corrupt_pkg):
    r = runner.invoke(app, ["inspect", str(pkg), "--verify"])
    assert r.exit_code == 0 and "verified 4 files" in r.output, r.output
    line = one_error_line(runner.invoke(app, ["inspect", str(corrupt_pkg), "--verify"]))
    assert "decoder.onnx" in line and "vision.onnx" not in line


def test_internal_error_keeps_its_traceback(runner, pkg, image_file, monkeypatch):
    import llava_edge.runtime.engine as engine
    import llava_edge.runtime.pipeline as pipeline

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "preprocess", broken)
    monkeypatch.setattr(engine, "preprocess", broken)  # `run` goes through the engine
    r = runner.invoke(app, ["run", str(pkg), "-i", str(image_file), "-p", "hi"])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)

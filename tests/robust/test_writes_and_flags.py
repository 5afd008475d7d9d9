"""Writes that fail (a full disk, a read-only mount, a closed pipe, an undecodable file name), special
files given as inputs, and numeric flags out of range: each is one `error:` line and exit 2 (a closed
pipe: quiet, exit 1), no traceback, and no partial file left behind.

Fast on purpose: flag checks run before any model loads (the package argument need not exist), and the
model work of eval/bench/random-checkpoint/export and `run` is replaced by stand-ins; only the write
paths under test are real. A full disk is /dev/full (writes fail with ENOSPC) or a patched fsync.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llava_edge import io_safe
from llava_edge.cli import app
from llava_edge.errors import ImageError, OutputError

from .conftest import REPO
from .test_errors import one_error_line

HAVE_DEV_FULL = sys.platform.startswith("linux") and os.path.exists("/dev/full")
NON_UTF8 = "r\udcff"  # the byte 0xff in a file name, as Python decodes argv and listdir (surrogateescape)


def _no_traceback_one_line(result) -> str:
    assert result.exit_code == 2, result.output
    return one_error_line(result)


# -- numeric flags -----------------------------------------------------------------------------------
RUN = ["run", "nope", "-p", "hi"]
CHAT = ["chat", "nope"]
WATCH = ["watch", "nope", "--source", "nope.mp4", "-p", "hi"]
FLAG_CASES = [
    (RUN + ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, not -1"),
    (RUN + ["--max-new-tokens", "99999999999"], "--max-new-tokens must be at most 2147483647"),
    (RUN + ["--top-p", "5"], "top_p must be in (0, 1]"),
    (RUN + ["--top-p", "nan"], "top_p must be a finite number"),
    (RUN + ["--temperature", "inf"], "temperature must be a finite number"),
    (RUN + ["--top-k", "-1"], "top_k must be >= 0"),
    (RUN + ["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (RUN + ["--seed", "-1"], "seed must be a non-negative integer"),
    (RUN + ["--max-image-pixels", "0"], "--max-image-pixels must be >= 1"),
    (RUN + ["--threads", "0"], "--threads must be >= 1"),
    (RUN + ["--threads", "5000"], "--threads must be at most 4096"),
    (CHAT + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (CHAT + ["--top-p", "5"], "top_p must be in (0, 1]"),
    (CHAT + ["--temperature", "nan"], "temperature must be a finite number"),
    (CHAT + ["--max-image-pixels", "0"], "--max-image-pixels must be >= 1"),
    (CHAT + ["--threads", "-2"], "--threads must be >= 1"),
    (WATCH + ["--every", "-1"], "--every must be > 0, not -1.0"),
    (WATCH + ["--every", "0"], "--every must be > 0"),
    (WATCH + ["--every", "nan"], "--every must be a finite number"),
    (WATCH + ["--every", "inf"], "--every must be a finite number"),
    (WATCH + ["--threshold", "-1"], "--threshold must be >= 0"),
    (WATCH + ["--threshold", "nan"], "--threshold must be a finite number"),
    (WATCH + ["--threshold", "300"], "--threshold must be at most 255"),
    (WATCH + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (WATCH + ["--max-frames", "0"], "--max-frames must be >= 1"),
    (WATCH + ["--threads", "0"], "--threads must be >= 1"),
    (["eval", "nope", "--n", "0"], "--n must be >= 1"),
    (["eval", "nope", "--n", "-5"], "--n must be >= 1"),
    (["eval", "nope", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "nope", "--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["bench", "nope", "--repeat", "0"], "--repeat must be >= 1"),
    (["bench", "nope", "--warmup", "-1"], "--warmup must be >= 0"),
    (["bench", "nope", "--batch", "0"], "--batch/--prompt-len must be >= 1"),
    (["bench", "nope", "--prompt-len", "4,-3"], "--batch/--prompt-len must be >= 1"),
    (["bench", "nope", "--threads", "0"], "--threads must be >= 1"),
    (["quantize", "nope", "--samples", "0"], "--samples must be >= 1"),
    (["quantize", "nope", "--bits", "3"], "--bits must be 4 or 8, not 3"),
    (["quantize", "nope", "--group-size", "0"], "--group-size must be a power of two"),
    (["quantize", "nope", "--group-size", "48"], "--group-size must be a power of two"),
    (["quantize", "nope", "--group-size", "8192"], "--group-size must be a power of two"),
    (["quantize", "nope", "--seed", "-1"], "--seed must be >= 0"),
    (["quantize", "nope", "--threads", "0"], "--threads must be >= 1"),
    (["export", "nope", "-o", "out", "--opset", "16"], "--opset must be >= 17"),
    (["export", "nope", "-o", "out", "--opset", "99"], "--opset must be at most 20"),
    (["export", "nope", "-o", "out", "--target", "cpu", "--check-layers", "0"], "--check-layers must be >= 1"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["build", "nope", "--dry-run", "--max-context", "-1"], "--max-context must be >= 1"),
    (["build", "nope", "--dry-run", "--max-images", "0"], "--max-images must be >= 1"),
    (["build", "nope", "--dry-run", "--workspace-gb", "inf"], "--workspace-gb must be a positive number"),
    (["build", "nope", "--dry-run", "--workspace-gb", "-1"], "--workspace-gb must be a positive number"),
]


@pytest.mark.parametrize("argv,needle", FLAG_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAG_CASES])
def test_numeric_flag_out_of_range_is_one_line(argv, needle, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "nope" and "out" are relative: nothing exists, nothing is written
    result = runner.invoke(app, argv)
    line = _no_traceback_one_line(result)
    assert needle in line, line
    assert list(tmp_path.iterdir()) == []


# -- special files as inputs ---------------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("cmd", ["run", "watch"])
def test_json_schema_dev_zero_is_named_not_read(cmd, runner):
    argv = (RUN if cmd == "run" else WATCH) + ["--json-schema", "/dev/zero"]
    line = _no_traceback_one_line(runner.invoke(app, argv))  # reading it would never end
    assert "--json-schema /dev/zero is not a regular file (a character device)" in line


def test_json_schema_fifo_and_oversized(runner, fifo, tmp_path):
    line = _no_traceback_one_line(runner.invoke(app, RUN + ["--json-schema", str(fifo)]))  # opening blocks
    assert f"--json-schema {fifo} is not a regular file (a named pipe)" in line
    big = tmp_path / "big.json"
    big.write_text('{"type": "object", "description": "' + "x" * (1 << 20) + '"}')
    line = _no_traceback_one_line(runner.invoke(app, RUN + ["--json-schema", str(big)]))
    assert "over the limit of 1.0 MB" in line


@pytest.mark.parametrize("which", ["dev-zero", "fifo"])
def test_image_special_file_is_named_not_not_found(which, runner, request):
    path = "/dev/zero" if which == "dev-zero" else str(request.getfixturevalue("fifo"))
    line = _no_traceback_one_line(runner.invoke(app, RUN + ["-i", path]))
    assert f"--image {path} is not a regular file" in line and "not found" not in line


def test_load_image_names_special_files_and_never_prints_a_repr(fifo):
    from llava_edge.runtime.preprocess import load_image

    with pytest.raises(ImageError, match="is not a regular file"):
        load_image(fifo)
    with pytest.raises(ImageError, match="image not found"):
        load_image(fifo.with_name("missing.png"))
    for source in (b"not an image", bytearray(b"\x89PNG\r\n\x1a\n broken")):
        with pytest.raises(ImageError) as e:
            load_image(source)
        assert "object at 0x" not in str(e.value) and "BytesIO" not in str(e.value), e.value
        assert str(e.value).startswith("cannot decode image data:"), e.value


# -- output files: whole or not at all -----------------------------------------------------------------
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def fake_eval(monkeypatch, tmp_path) -> Path:
    """`eval` on a stand-in package whose answers are instant (the writing is what is tested)."""
    import llava_edge.synthetic.evaluate as ev

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text("{}")
    monkeypatch.setattr(ev, "package_answerer", lambda *a, **k: None)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"count": {"n": 1, "accuracy": 1.0}})
    monkeypatch.setattr(ev, "format_table", lambda r: "| table |")
    return pkg


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def test_eval_output_is_written_whole(runner, fake_eval, tmp_path):
    out = tmp_path / "res" / "out.json"
    result = runner.invoke(app, ["eval", str(fake_eval), "--n", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["count"]["n"] == 1
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("existing", [False, True])
def test_eval_output_on_a_full_disk_leaves_no_file(existing, runner, fake_eval, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    if existing:
        out.write_text("previous results")
    monkeypatch.setattr(io_safe.os, "fsync", _enospc)  # delayed allocation: the error comes at fsync
    result = runner.invoke(app, ["eval", str(fake_eval), "--n", "1", "-o", str(out)])
    line = _no_traceback_one_line(result)
    assert line == f"error: cannot write {out}: No space left on device"
    assert (out.read_text() == "previous results") if existing else not out.exists()  # never a 0-byte file
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not HAVE_DEV_FULL, reason="needs Linux /dev/full")
def test_eval_output_to_dev_full_is_one_line(runner, fake_eval):
    line = _no_traceback_one_line(runner.invoke(app, ["eval", str(fake_eval), "--n", "1", "-o", "/dev/full"]))
    assert line == "error: cannot write /dev/full: No space left on device"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names are bytes on Linux")
def test_non_utf8_output_name_is_written_and_printed_safely(runner, fake_eval, tmp_path, monkeypatch):
    out = tmp_path / f"{NON_UTF8}.json"
    result = runner.invoke(app, ["eval", str(fake_eval), "--n", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert b"r\xff.json" in os.listdir(os.fsencode(tmp_path))  # the very bytes the user gave
    monkeypatch.setattr(io_safe.os, "fsync", _enospc)
    out2 = tmp_path / f"{NON_UTF8}2.json"
    line = _no_traceback_one_line(runner.invoke(app, ["eval", str(fake_eval), "--n", "1", "-o", str(out2)]))
    assert line == f"error: cannot write {tmp_path}/r\\xff2.json: No space left on device"
    assert not out2.exists()


def test_bench_outputs_are_atomic(runner, tmp_path, monkeypatch):
    import llava_edge.benchmarks.harness as harness
    import llava_edge.benchmarks.report as report

    seen = {}

    def fake_run_benchmark(*a, **k):
        seen.update(k)
        return types.SimpleNamespace(to_json=lambda: '{"results": []}')

    monkeypatch.setattr(harness, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(report, "markdown", lambda rep, cmd: "# bench\n" + cmd)
    out, md = tmp_path / "b.json", tmp_path / f"{NON_UTF8}.md"
    result = runner.invoke(app, ["bench", "nope", "-o", str(out), "--md", str(md)])
    assert result.exit_code == 0, result.output
    assert seen["out_json"] is None and seen["plot"] is None  # the CLI writes them, atomically
    assert json.loads(out.read_text()) == {"results": []} and md.read_text(errors="surrogateescape").startswith("#")
    out.unlink()
    md.unlink()
    monkeypatch.setattr(io_safe.os, "fsync", _enospc)
    line = _no_traceback_one_line(runner.invoke(app, ["bench", "nope", "-o", str(out), "--md", str(md)]))
    assert line == f"error: cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_removes_its_temp_file_on_ctrl_c(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(KeyboardInterrupt):
        with io_safe.atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"  # writers that pick a format by suffix
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="is a directory"):
        io_safe.write_atomic(tmp_path, "x")


# -- directory writers (staged): one line, staging removed ---------------------------------------------
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    OSError(errno.EROFS, os.strerror(errno.EROFS)),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                 "\"No space left on device\" })"),  # safetensors' way of saying it
], ids=["enospc", "erofs", "safetensors-text"])
def test_random_checkpoint_full_disk_is_one_line_and_no_staging_left(failure, runner, tmp_path, monkeypatch):
    import llava_edge.benchmarks.arch as arch

    def half_written(spec, tmp):
        (Path(tmp) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise failure

    monkeypatch.setattr(arch, "build_random_checkpoint", half_written)
    out = tmp_path / "ck"
    line = _no_traceback_one_line(runner.invoke(app, ["random-checkpoint", "small-100m", str(out)]))
    reason = os.strerror(errno.EROFS) if failure.args[0] == errno.EROFS else "No space left on device"
    assert line == f"error: cannot write {out}: {reason}"
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its staging directory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names are bytes on Linux")
@pytest.mark.parametrize("cmd", ["export", "random-checkpoint", "quantize", "demo"])
def test_non_utf8_directory_output_is_refused_by_name(cmd, runner, tmp_path):
    """tokenizers, safetensors and onnx encode their str paths as UTF-8: such a name would end in their
    traceback halfway through the export, so it is refused first, printed with \\xff for the byte."""
    out = str(tmp_path / f"p-{NON_UTF8}")
    argv = {"export": ["export", str(tmp_path), "-o", out], "quantize": ["quantize", "nope", "-o", out],
            "random-checkpoint": ["random-checkpoint", "small-100m", out], "demo": ["demo", "--workdir", out]}[cmd]
    line = _no_traceback_one_line(runner.invoke(app, argv))
    assert "p-r\\xff: the path is not valid UTF-8 (byte 0xff)" in line, line
    assert list(tmp_path.iterdir()) == []


def test_export_full_disk_is_one_line(runner, tmp_path, monkeypatch):
    fake = types.ModuleType("llava_edge.export.exporter")
    fake.export_package = lambda *a, **k: _enospc()
    monkeypatch.setitem(sys.modules, "llava_edge.export.exporter", fake)  # no torch import, no model
    (tmp_path / "ck").mkdir()
    out = tmp_path / "pkg"
    line = _no_traceback_one_line(runner.invoke(app, ["export", str(tmp_path / "ck"), "-o", str(out)]))
    assert line == f"error: cannot write {out}: No space left on device"


def test_an_unrelated_oserror_keeps_its_traceback(runner, tmp_path, monkeypatch):
    import llava_edge.benchmarks.arch as arch

    monkeypatch.setattr(arch, "build_random_checkpoint", lambda spec, tmp: (_ for _ in ()).throw(
        OSError(errno.EBADF, "a bug, not the disk")))
    result = runner.invoke(app, ["random-checkpoint", "small-100m", str(tmp_path / "ck")])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EBADF


# -- standard output: `run > /dev/full`, `run | head` -------------------------------------------------
# `run` with a stand-in pipeline that streams many words (more than a pipe holds), in a real process
# whose stdout is the real file descriptor
FAKE_RUN = r"""
import sys, types
import llava_edge.runtime.pipeline as P

N = 20000
class Result:
    text, token_ids, finish_reason = "word " * N, [1] * N, "length"
    timings = types.SimpleNamespace(vision_ms=0.0, prefill_ms=0.0, tokens_per_s=1.0)
    def as_dict(self):
        return {"text": self.text}
class Fake:
    def run(self, reqs, *args, **kw):
        for _ in range(N):
            yield types.SimpleNamespace(text="word ")
        return [Result()]
    run_engine = run
P.Pipeline.from_package = staticmethod(lambda *a, **k: Fake())
from llava_edge.cli import app
sys.argv[0] = "llava-edge"
app()
"""


def _cli(args: list[str], stdout) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", FAKE_RUN, *args], stdout=stdout, stderr=subprocess.PIPE,
                            env=env, cwd=REPO)


@pytest.mark.skipif(not HAVE_DEV_FULL, reason="needs Linux /dev/full")
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["stream", "json"])
def test_run_to_a_full_disk_is_one_line(extra):
    with open("/dev/full", "w") as full:
        proc = _cli(["run", "nope", "-p", "hi", *extra], full)
        _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert text.strip().splitlines() == ["error: cannot write to standard output: No space left on device"]


@pytest.mark.skipif(not HAVE_DEV_FULL, reason="needs Linux /dev/full")
def test_help_to_a_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        proc = _cli(["--help"], full)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err.decode(), err.decode()
    assert err.decode().strip() == "error: cannot write to standard output: No space left on device"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["stream", "json"])
def test_run_into_a_closed_pipe_is_quiet(extra):
    proc = _cli(["run", "nope", "-p", "hi", *extra], subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the answer
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 1, err
    assert err == "", err  # no traceback, no "Exception ignored", no error line: as other tools

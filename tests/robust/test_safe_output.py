"""Outputs: only our packages are replaced, atomically; staging is cleaned on SIGTERM and, when a
process was killed outright, by the next stage; digests are recorded while packages are written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_edge.cli import app
from llava_edge.errors import OutputError
from llava_edge.package import (PackageError, clean_stale_staging, file_sha256, load_manifest, package_files,
                                staged_package, verify_package, write_manifest)

from .conftest import REPO, tree_digest

# A child that stages a package, says so, and waits to be killed.
STAGER = """
import sys, time
from llava_edge.package import staged_package
with staged_package(sys.argv[1]) as tmp:
    (tmp / "manifest.json").write_text("{}")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _stager(out: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", STAGER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    staging = Path(proc.stdout.readline().strip())
    assert staging.is_dir() and f".partial-{proc.pid}-" in staging.name
    return proc, staging


def test_sigterm_removes_the_staging_directory(tmp_path):
    proc, staging = _stager(tmp_path / "out")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) != 0
    assert not staging.exists() and list(tmp_path.iterdir()) == []


def test_sigterm_during_cli_export_cleans_up_and_says_so(checkpoint, tmp_path):
    """The real thing: `llava-edge export` in a subprocess, SIGTERM while its package is staged."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llava_edge.cli", "export", str(checkpoint), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "export ended before staging was seen"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_stale_staging_of_a_killed_process_is_named_and_removed(tmp_path, caplog):
    proc, staging = _stager(tmp_path / "out")
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait(timeout=20)
    assert staging.exists()
    live = tmp_path / f".other.partial-{os.getpid()}-x"  # ours, alive: kept
    live.mkdir()
    with caplog.at_level(logging.WARNING, logger="llava_edge"):
        with staged_package(tmp_path / "out") as tmp:
            (tmp / "x").write_text("y")
    assert not staging.exists() and live.exists()
    assert str(staging) in caplog.text and f"process {proc.pid}" in caplog.text
    assert clean_stale_staging(tmp_path) == []


def test_signals_wait_for_the_swap_then_arrive():
    from llava_edge.errors import Terminated
    from llava_edge.package import signals_deferred, sigterm_as_interrupt

    done = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler would have run here
                done.append("swapped")
    assert done == ["swapped"]


def test_failed_replacement_keeps_the_old_package(pkg, tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(pkg, target)
    before = tree_digest(target)
    with pytest.raises(RuntimeError):
        with staged_package(target, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
            raise RuntimeError("export failed half way")
    assert tree_digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_overwrite_replaces_a_package_of_ours_and_says_it_removed_stale_staging(runner, pkg, checkpoint, tmp_path):
    proc, staging = _stager(tmp_path / "pkg")
    proc.kill()  # a stage killed outright leaves its staging directory
    proc.wait(timeout=20)
    target = tmp_path / "pkg"
    shutil.copytree(pkg, target)
    old_manifest = (target / "manifest.json").read_text()
    r = runner.invoke(app, ["export", str(checkpoint), "-o", str(target), "--overwrite"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"process {proc.pid}" in " ".join(r.output.split()), r.output
    m = load_manifest(target)
    assert m.source["path"] == str(checkpoint.resolve()) and (target / "manifest.json").read_text() != old_manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "pkg"]  # no staging, no .old left


def test_overwrite_refusals_before_any_work(tmp_path, checkpoint, monkeypatch):
    from llava_edge.package import check_output_dir

    for target in (checkpoint, checkpoint.parent, tmp_path):
        with pytest.raises(OutputError):
            check_output_dir(target, overwrite=True, protect=[checkpoint])
    monkeypatch.chdir(checkpoint)
    with pytest.raises(OutputError, match="current directory"):
        check_output_dir(".", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    check_output_dir(tmp_path / "new" / "pkg")  # missing is fine


def test_manifest_records_a_sha256_per_file(pkg):
    m = load_manifest(pkg)
    assert set(m.digests) == set(package_files(m)) == {"tokenizer.json", "vision.onnx", "embed.onnx", "decoder.onnx"}
    for rel, digest in m.digests.items():
        assert file_sha256(pkg / rel) == digest
    assert verify_package(pkg)[1] == []


def test_write_manifest_keeps_digests_of_unchanged_files_and_rehashes_rewritten_ones(pkg, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(pkg, d)  # copy2: file times older than the copied manifest
    m = load_manifest(d)
    m.digests["vision.onnx"] = "kept-not-recomputed"
    time.sleep(0.01)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text() + " ")  # rewritten after the manifest
    write_manifest(d, m)
    m2 = load_manifest(d, verify=False)
    assert m2.digests["vision.onnx"] == "kept-not-recomputed"
    assert m2.digests["tokenizer.json"] == file_sha256(d / "tokenizer.json")
    assert verify_package(d)[1] == ["vision.onnx"]
    with pytest.raises(PackageError, match="vision.onnx differs from the sha256"):
        load_manifest(d)  # a small package is re-hashed on load
    assert json.loads((d / "manifest.json").read_text())["digests"]["decoder.onnx"] == m.digests["decoder.onnx"]

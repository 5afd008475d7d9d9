"""`llava-edge serve` with no PACKAGE: the built-in model exported once into a cache directory, reused,
rebuilt when broken, never written over something that is not ours; and the no-slots hint."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.errors import OutputError, UsageError
from llava_edge.package import load_manifest
from llava_edge import demo as builtin
from llava_edge.demo import CACHE_ENV, builtin_dir, builtin_package
from llava_edge.serve.hints import slots_hint


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One real export into a fresh cache (the only one this module pays for); its lines said."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(root))
    said: list[str] = []
    pkg = builtin_package(said.append)
    mp.undo()
    return root, pkg, said


@pytest.fixture
def cache(cached, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(cached[0]))
    return cached[1]


def _no_export(asset, dest):
    raise AssertionError("exported again")


def test_first_call_exports_a_loadable_package_with_the_fast_decoder(cached):
    root, pkg, said = cached
    assert pkg.parent == root and pkg.name.startswith("builtin-")
    manifest = load_manifest(pkg, verify=True)
    assert {"vision", "embed", "decoder", "decoder_fast"} <= set(manifest.graphs)
    assert len(said) == 1 and said[0].startswith(f"exporting the built-in model once into {pkg}")
    assert not [p.name for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name]  # staged


def test_second_call_reuses_it_without_exporting(cache, monkeypatch):
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()}
    dir_ino = cache.stat().st_ino
    monkeypatch.setattr(builtin, "_export", _no_export)
    said: list[str] = []
    assert builtin_package(said.append) == cache
    assert said == []
    assert cache.stat().st_ino == dir_ino
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir()} == before


def test_the_cache_path_follows_the_asset_and_the_environment(cached, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert builtin_dir().parent == tmp_path / "elsewhere"
    assert builtin_dir() == tmp_path / "elsewhere" / cached[1].name
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin_dir().parent == tmp_path / "xdg" / "llava-edge"
    (tmp_path / "asset").mkdir()
    (tmp_path / "asset" / "config.json").write_text("{}")
    assert builtin_dir(tmp_path / "asset").name != cached[1].name  # another asset, another directory


def test_a_broken_cached_package_is_rebuilt(cached, monkeypatch, tmp_path):
    """A graph file damaged (the manifest still parses): re-exported through the staging directory."""
    root, pkg, _ = cached
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    target = builtin_dir()
    shutil.copytree(pkg, target)
    data = target / "decoder_fast.onnx.data"
    data.write_bytes(data.read_bytes()[:100])  # truncated
    exported = []

    def copy_export(asset, dest):  # the real export is test_first_call's; here the rebuild logic
        exported.append(dest)
        assert dest.parent == tmp_path and dest != target  # staged next to the target, not in it
        shutil.copytree(pkg, dest, dirs_exist_ok=True)

    monkeypatch.setattr(builtin, "_export", copy_export)
    said: list[str] = []
    assert builtin_package(said.append) == target
    assert len(exported) == 1 and said[0].startswith("re-exporting the built-in model")
    assert "decoder_fast" in load_manifest(target, verify=True).graphs
    assert sorted(p.name for p in tmp_path.iterdir()) == [".builtin.lock", target.name]


def test_an_interrupted_export_leaves_no_package(cached, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def interrupted(asset, dest):
        shutil.copytree(cached[1], dest, dirs_exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builtin_package(lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == [".builtin.lock"]


@pytest.mark.parametrize("kind", ["foreign-dir", "file", "manifest-plus-user-file"])
def test_something_not_ours_at_the_cache_path_is_left_alone(cached, monkeypatch, tmp_path, kind):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(builtin, "_export", _no_export)
    target = builtin_dir()
    if kind == "file":
        target.write_text("mine")
    elif kind == "foreign-dir":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:  # a package (broken, so it is not reused) with a file of the user's beside it
        shutil.copytree(cached[1], target)
        (target / "decoder_fast.onnx.data").unlink()
        (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"left alone.*{CACHE_ENV}"):
        builtin_package(lambda line: None)
    assert (target.read_text() if kind == "file" else (target / "notes.txt").read_text()) == "mine"


def test_without_the_export_extra_one_line_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'llava-edge\[export\]'.*or give a PACKAGE"):
        builtin_package(lambda line: None)
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2, r.output
    assert [line for line in r.output.splitlines() if line.strip()] == \
        [line for line in r.output.splitlines() if line.startswith("error:")]
    assert "llava-edge[export]" in r.output and list(tmp_path.iterdir()) == []


def _captured_serve(monkeypatch):
    import llava_edge.serve.server as server

    got = []
    monkeypatch.setattr(server, "serve", lambda config, **kw: got.append(config))
    return got


def test_serve_without_a_package_serves_the_cached_builtin(cache, monkeypatch):
    got = _captured_serve(monkeypatch)
    monkeypatch.setattr(builtin, "_export", _no_export)
    r = CliRunner().invoke(app, ["serve", "--port", "8123"])
    assert r.exit_code == 0, r.output
    assert got[0].package == cache and got[0].model_name == "tiny-llava" and got[0].port == 8123
    assert "note:" not in r.output  # it has slots: no hint


def test_a_bad_flag_is_refused_before_the_first_export(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(builtin, "_export", _no_export)
    got = _captured_serve(monkeypatch)
    r = CliRunner().invoke(app, ["serve", "--max-slots", "0"])
    assert r.exit_code == 2, r.output
    assert got == [] and list(tmp_path.iterdir()) == []


def _portable_only(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    del m["graphs"]["decoder_fast"]
    m["extra"].pop("fast_decoders", None)
    m["digests"] = {k: v for k, v in m.get("digests", {}).items() if not k.startswith("decoder_fast")}
    (dest / "manifest.json").write_text(json.dumps(m))
    for p in dest.glob("decoder_fast*"):
        p.unlink()
    return dest


def test_a_package_without_slots_gets_a_one_line_hint(cached, monkeypatch, tmp_path):
    pkg = _portable_only(cached[1], tmp_path / "portable")
    hint = slots_hint(pkg)
    assert hint and "one request at a time" in hint and f"-o {pkg} --fast --overwrite" in hint
    assert "--target cpu-int4" in hint
    assert slots_hint(cached[1]) is None
    assert "--backend auto" in slots_hint(cached[1], "ort")  # it has a fast decoder: say so
    assert slots_hint(tmp_path / "missing") is None  # the server's own load reports that
    got = _captured_serve(monkeypatch)
    r = CliRunner().invoke(app, ["serve", str(pkg)])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--fast --overwrite" in notes[0], r.output
    assert got[0].package == pkg and got[0].model_name == "portable"

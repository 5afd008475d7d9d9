from __future__ import annotations

import json
import shutil

import pytest

from llava_edge.errors import OutputError
from llava_edge.package import PackageError, load_manifest, staged_package


def test_manifest_round_trip(tiny_models):
    pkg = tiny_models["llava-hf-v1.5"]["package"]
    m = load_manifest(pkg)
    assert set(m.graphs) == {"vision", "embed", "decoder"}
    assert m.text.image_token_id == 384 and m.vision.num_image_tokens == 16
    assert m.graphs["decoder"].max_abs_error < 1e-4
    assert m.extra["verification"]["pipeline_logits"] < 1e-4
    assert json.loads(m.to_json()) == json.loads((pkg / "manifest.json").read_text())


def test_truncated_graph_is_refused(tiny_models, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_models["llava-hf-v1.5"]["package"], pkg)
    data = (pkg / "decoder.onnx").read_bytes()
    (pkg / "decoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="corrupt"):
        load_manifest(pkg)
    (pkg / "decoder.onnx").unlink()
    with pytest.raises(PackageError, match="missing file decoder.onnx"):
        load_manifest(pkg)


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{ nope")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_staged_package_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_package(target) as tmp:
            (tmp / "manifest.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_staged_package_refuses_non_empty_target_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        with staged_package(target):
            pass
    with pytest.raises(OutputError, match="not a llava-edge package"):  # --overwrite replaces only our packages
        with staged_package(target, overwrite=True):
            pass
    assert (target / "keep.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

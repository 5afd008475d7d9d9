"""The shipped trained tiny LLaVA survives export: the package answers as the PyTorch checkpoint does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_edge.cli import app

ASSET = Path(__file__).resolve().parents[2] / "llava_edge" / "assets" / "tiny_llava"
pytestmark = pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="trained asset not shipped")


@pytest.fixture(scope="module")
def trained_package(tmp_path_factory):
    from llava_edge.export.exporter import export_package

    pkg = tmp_path_factory.mktemp("trained") / "pkg"
    export_package(ASSET, pkg)
    return pkg


def test_package_accuracy_equals_checkpoint_accuracy(trained_package, tmp_path):
    runner = CliRunner()
    res = {}
    for name, target in (("package", trained_package), ("checkpoint", ASSET)):
        out = tmp_path / f"{name}.json"
        r = runner.invoke(app, ["eval", str(target), "--n", "6", "-o", str(out)])
        assert r.exit_code == 0, r.output
        res[name] = json.loads(out.read_text())
    for qtype, want in res["checkpoint"].items():
        got = res["package"][qtype]
        assert got["n"] == want["n"]
        assert abs(got["accuracy"] - want["accuracy"]) <= 0.005, qtype
    # and the model really sees: counting is far above its majority-class chance
    assert res["package"]["count"]["accuracy"] > res["package"]["count"]["chance"] + 0.2

"""`export --fast/--fast-int4` on the portable target: every graph from the one loaded checkpoint (its
--vision-tower included), written in the staging directory and verified before the package appears."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.export import exporter, fast_decoder
from llava_edge.export.exporter import ExportError, resolve_options
from llava_edge.package import load_manifest

runner = CliRunner()


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_a_failing_fast_build_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    """The fast decoder is built inside the staging directory: when it fails, no package (and no staging
    directory) is left, where the CLI used to leave a portable package it then added to."""
    def broken(*args, **kwargs):
        raise ExportError("fast build broke")

    monkeypatch.setattr(fast_decoder, "build_fast_decoder", broken)
    out = tmp_path / "pkg"
    r = runner.invoke(app, ["export", str(tiny_models["llava-hf-gqa"]["checkpoint"]), "-o", str(out), "--fast"])
    assert r.exit_code == 2 and "fast build broke" in r.output, r.output
    assert not out.exists() and _leftovers(tmp_path, "pkg") == []
    # --overwrite: the package that was there is still there, untouched
    shutil.copytree(tiny_models["llava-hf-gqa"]["package"], out)
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, ["export", str(tiny_models["llava-hf-gqa"]["checkpoint"]), "-o", str(out), "--fast-int4",
                            "--overwrite"])
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in out.iterdir()) == before and _leftovers(tmp_path, "pkg") == ["pkg"]


def test_vision_tower_reaches_the_fast_decoders(tiny_models, tmp_path, monkeypatch):
    """An original-layout checkpoint whose tower is a hub name exports with --vision-tower --fast: the fast
    decoders are written from the model loaded with that tower (the CLI used to reload the checkpoint
    without it, after the package was written), and are checked."""
    ck = tmp_path / "orig"
    shutil.copytree(tiny_models["original-v1"]["checkpoint"], ck)
    shutil.move(ck / "clip-vision", tmp_path / "clip")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ck / "config.json").write_text(json.dumps(cfg))
    loads = []
    real = exporter.load_checkpoint
    monkeypatch.setattr(exporter, "load_checkpoint",
                        lambda *a, **k: loads.append(k.get("vision_tower")) or real(*a, **k))
    out = tmp_path / "pkg"
    r = runner.invoke(app, ["export", str(ck), "-o", str(out), "--vision-tower", str(tmp_path / "clip"), "--fast",
                            "--fast-int4"])
    assert r.exit_code == 0, r.output
    assert loads == [tmp_path / "clip"]  # one load, with the tower
    m = load_manifest(out)
    assert {"decoder", "decoder_fast", "decoder_fast_int4"} <= set(m.graphs)
    assert set(m.extra["fast_decoders"]) == {"decoder_fast", "decoder_fast_int4"}
    assert m.extra["fast_decoders"]["decoder_fast_int4"]["lm_head_bits"] == 8  # --lm-head auto
    assert m.extra["fast_decoders"]["decoder_fast"]["lm_head_bits"] is None
    assert m.extra["lm_head"] == "float"  # the portable decoder's
    v = m.extra["verification"]
    assert v["decoder_fast_logits"] < 1e-2 and v["decoder_fast_int4_vs_twin"] < exporter.INT4_RELATIVE_TOLERANCE
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left
    assert not [g for g in m.graphs if "twin" in g]


def test_fast_decoder_options():
    """Which fast decoders a portable export ships, and their lm_head."""
    def fast(**kw):
        return [(c.name, c.quant, c.lm_head_bits) for c in resolve_options("fp32", 17, "portable", "auto",
                                                                           kw.pop("lm_head", "auto"), None, 128,
                                                                           "auto", **kw).fast]

    assert fast() == []
    assert fast(fast=True, fast_int4=True) == [("decoder_fast", None, None), ("decoder_fast_int4", "int4-rtn", 8)]
    assert fast(fast=True, lm_head="int8") == [("decoder_fast", None, 8)]
    assert fast(fast_int4=True, lm_head="float") == [("decoder_fast_int4", "int4-rtn", None)]
    with pytest.raises(ExportError, match="int8 lm_head lives in the fast decoder"):
        fast(lm_head="int8")
    with pytest.raises(ExportError, match="holds one decoder"):
        resolve_options("fp32", 17, "cpu", "auto", "auto", None, 128, "auto", fast=True)

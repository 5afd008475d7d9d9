"""Deployment targets: `export --target cpu|cpu-int4` writes vision + embed + that one fast decoder, verified
at export, and runs the same greedy tokens as that decoder in a full package; what it lacks is refused
with the command that adds it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.package import graph_size, load_manifest

runner = CliRunner()
PRESET = "llava-hf-gqa"


@pytest.fixture(scope="module")
def packages(tiny_models, tmp_path_factory):
    """One tiny checkpoint exported four ways: everything (portable + fast + int4 fast), cpu, cpu-int4
    (int8 embedding table and vision tower by default) and cpu-int4 with the full package's float table
    and fp32 tower."""
    ck = str(tiny_models[PRESET]["checkpoint"])
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for name, flags in (("full", ["--fast", "--fast-int4"]), ("cpu", ["--target", "cpu"]),
                        ("cpu-int4", ["--target", "cpu-int4"]),
                        ("cpu-int4-float", ["--target", "cpu-int4", "--embed", "float", "--vision", "fp32"])):
        r = runner.invoke(app, ["export", ck, "-o", str(root / name), *flags])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(path)
    return path


def _tokens(pkg, image, *flags):
    r = runner.invoke(app, ["run", str(pkg), "--image", str(image), "--prompt", "What is in the picture?",
                            "--max-new-tokens", "20", "--json", *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])["token_ids"]


def _error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    for n in needles:
        assert n in text, result.output


def test_cpu_int4_package_holds_only_its_graphs(packages):
    full, small = load_manifest(packages["full"]), load_manifest(packages["cpu-int4"])
    assert list(small.graphs) == ["vision", "embed", "decoder_fast_int4"]
    assert small.extra["target"] == "cpu-int4" and full.extra["target"] == "portable"
    files = sorted(p.name for p in packages["cpu-int4"].iterdir())
    assert files == ["decoder_fast_int4.onnx", "decoder_fast_int4.onnx.data", "embed.onnx", "manifest.json",
                     "tokenizer.json", "vision.onnx", "vision.onnx.data"]  # no portable or fp32 decoder, no scratch
    assert set(small.digests) == {"tokenizer.json", *files} - {"manifest.json"}
    # the same graphs, byte for byte in size, minus the two decoders the target does not need
    for name, g in small.graphs.items():
        assert g.size_bytes == graph_size(packages["cpu-int4"], g)
        if name not in ("embed", "vision"):
            assert g.size_bytes == full.graphs[name].size_bytes
    assert small.graphs["embed"].size_bytes < 0.4 * full.graphs["embed"].size_bytes  # int8 (the tiny tower's
    # int8 graph is mostly fixed overhead; tests/export/test_vision_int8.py checks it)
    assert small.extra["vision_quant"]["option"] == "int8" and "vision_quant" not in full.extra
    # int8 by default in cpu-int4: the embedding table and the int4 decoder's lm_head (here also in full's)
    assert small.extra["embed"] == "int8" and load_manifest(packages["cpu"]).extra["embed"] == "float"
    assert small.extra["fast_decoders"]["decoder_fast_int4"]["lm_head_bits"] == 8
    assert full.extra["fast_decoders"]["decoder_fast_int4"]["lm_head_bits"] == 8
    assert full.extra["fast_decoders"]["decoder_fast"]["lm_head_bits"] is None
    # the int4 decoder written from the checkpoint a tensor at a time (--target) is the one written from
    # the loaded model (--fast-int4), byte for byte
    for f in ("decoder_fast_int4.onnx", "decoder_fast_int4.onnx.data"):
        assert small.digests[f] == full.digests[f], f
    dropped = (full.graphs["decoder"].size_bytes + full.graphs["decoder_fast"].size_bytes
               + sum(full.graphs[n].size_bytes - small.graphs[n].size_bytes for n in ("embed", "vision")))
    size = {k: sum(f.stat().st_size for f in p.iterdir()) for k, p in packages.items()}
    assert size["full"] - size["cpu-int4"] == pytest.approx(dropped, abs=16_000)  # manifests differ a little
    print(f"\npackage bytes: full {size['full']}, cpu {size['cpu']}, cpu-int4 {size['cpu-int4']} "
          f"({size['cpu-int4'] / size['full']:.2f} of full)")
    v = small.extra["verification"]  # the checks ran and passed at export
    assert v["decoder_fast_logits"] < 1e-3 and v["decoder_fast_int4_vs_twin"] < 0.1
    assert 0 < v["embed_int8_relative"] < 1e-2


def test_cpu_int4_greedy_tokens_equal_the_full_packages_int4_decoder(packages, tmp_path):
    image = _image(tmp_path)
    want = _tokens(packages["full"], image, "--backend", "ort-fast-int4")
    assert _tokens(packages["cpu-int4-float"], image) == want  # default backend: auto -> ort-fast-int4
    assert len(want) == 20


def test_cpu_target_greedy_tokens_equal_the_portable_decoder(packages, tmp_path):
    image = _image(tmp_path)
    assert list(load_manifest(packages["cpu"]).graphs) == ["vision", "embed", "decoder_fast"]
    assert not (packages["cpu"] / "decoder.onnx").exists()
    assert _tokens(packages["cpu"], image) == _tokens(packages["full"], image, "--backend", "ort")


def test_missing_graphs_are_refused_with_the_command_that_adds_them(packages, tiny_models):
    pkg, ck = str(packages["cpu-int4"]), str(tiny_models[PRESET]["checkpoint"])
    run = ["run", pkg, "--prompt", "hi", "--max-new-tokens", "2"]
    _error(runner.invoke(app, [*run, "--backend", "ort"]), "no 'decoder' graph",
           f"`llava-edge export {ck} -o {pkg} --overwrite`")
    _error(runner.invoke(app, [*run, "--backend", "ort-fast"]), "no 'decoder_fast' graph",
           f"`llava-edge export {ck} -o {pkg} --fast --overwrite`")
    _error(runner.invoke(app, ["quantize", pkg, "--checkpoint", ck]), "starts from the portable decoder",
           "--target cpu-int4", f"llava-edge export {ck} -o NEW_PKG")
    _error(runner.invoke(app, ["build", pkg, "--dry-run", "--trt-version", "10.3"]), "starts from the portable decoder")
    _error(runner.invoke(app, ["export", ck, "-o", str(packages["cpu"].parent / "x"), "--target", "cpu", "--fast"]),
           "--target cpu holds one decoder")
    _error(runner.invoke(app, ["export", ck, "-o", str(packages["cpu"].parent / "x"), "--target", "gpu"]),
           "--target 'gpu'")
    r = runner.invoke(app, ["inspect", pkg])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "target: cpu-int4 (decoders: decoder_fast_int4)" in text
    assert "weights: embed int8, fast decoders' lm_head decoder_fast_int4 int8" in text
    _error(runner.invoke(app, ["export", ck, "-o", str(packages["cpu"].parent / "x"), "--embed", "int4"]),
           "--embed 'int4'")
    _error(runner.invoke(app, ["export", ck, "-o", str(packages["cpu"].parent / "x"), "--lm-head", "int8"]),
           "--lm-head int8 applies to fast decoders")
    _error(runner.invoke(app, ["export", ck, "-o", str(packages["cpu"].parent / "x"), "--embed", "int8"]),
           "--embed int8 is for --target cpu or cpu-int4")


def test_a_broken_int4_graph_fails_the_export_check(tiny_models, tmp_path, monkeypatch):
    """The int4 graph is checked against its float twin: nibbles packed the wrong way round are caught."""
    from llava_edge.export import fast_decoder
    from llava_edge.export.exporter import ExportError, export_package

    real = fast_decoder.pack
    monkeypatch.setattr(fast_decoder, "pack", lambda q, bits: (lambda b: (b << 4) | (b >> 4))(real(q, bits)))
    with pytest.raises(ExportError, match="int4 graph is broken"):
        export_package(tiny_models[PRESET]["checkpoint"], tmp_path / "pkg", target="cpu-int4")
    assert not (tmp_path / "pkg").exists()


def test_a_broken_int8_embedding_fails_the_export_check(tiny_models, tmp_path, monkeypatch):
    """The int8 table is checked against the float rows: scales off by 2x are caught."""
    from llava_edge.export import embed_int8
    from llava_edge.export.exporter import ExportError, export_package

    real = embed_int8.quantize_rows
    monkeypatch.setattr(embed_int8, "quantize_rows", lambda w, bs: (lambda c, s: (c, s * 2))(*real(w, bs)))
    with pytest.raises(ExportError, match="int8 embed graph is broken"):
        export_package(tiny_models[PRESET]["checkpoint"], tmp_path / "pkg", target="cpu-int4")
    assert not (tmp_path / "pkg").exists()


def test_float_embedding_and_head_on_request(tiny_models, tmp_path):
    """--embed float --lm-head float give the float table and a float lm_head MatMul in a cpu-int4 package."""
    import onnx

    ck = str(tiny_models[PRESET]["checkpoint"])
    r = runner.invoke(app, ["export", ck, "-o", str(tmp_path / "p"), "--target", "cpu-int4", "--embed", "float",
                            "--lm-head", "float"])
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "p")
    assert m.extra["embed"] == "float" and m.extra["fast_decoders"]["decoder_fast_int4"]["lm_head_bits"] is None
    embed_ops = {n.op_type for n in onnx.load(str(tmp_path / "p" / "embed.onnx")).graph.node}
    assert "GatherBlockQuantized" not in embed_ops
    dec = onnx.load(str(tmp_path / "p" / "decoder_fast_int4.onnx"), load_external_data=False).graph.node
    head = [n for n in dec if any(i.startswith("lm_head.") for i in n.input)]
    assert [n.op_type for n in head] == ["MatMul"]


def test_int4_block_size_on_request(tiny_models, tmp_path):
    """--int4-block 64: every int4 MatMulNBits whose K it divides uses blocks of 64 (the rest 32), the export
    checks pass with it, and the manifest records it; a block onnxruntime has no kernel for is refused."""
    import onnx

    ck = str(tiny_models[PRESET]["checkpoint"])
    r = runner.invoke(app, ["export", ck, "-o", str(tmp_path / "p"), "--target", "cpu-int4", "--int4-block", "64"])
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "p")
    assert m.extra["fast_decoders"]["decoder_fast_int4"]["block_size"] == 64
    assert m.extra["verification"]["decoder_fast_int4_vs_twin"] < 0.1
    nodes = onnx.load(str(tmp_path / "p" / "decoder_fast_int4.onnx"), load_external_data=False).graph.node
    int4 = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"
            and "lm_head" not in n.input[1]]
    assert int4 and all(a["block_size"] == (64 if a["K"] % 64 == 0 else 32) for a in int4)
    assert any(a["block_size"] == 64 for a in int4)
    _error(runner.invoke(app, ["export", ck, "-o", str(tmp_path / "q"), "--target", "cpu-int4", "--int4-block", "100"]),
           "int4 block 100: use one of 32, 64, 128, 256")


@pytest.mark.parametrize("target,embed", [("cpu", "float"), ("cpu-int4", "int8")])
def test_a_large_embedding_table_is_written_to_a_mapped_data_file(packages, tiny_models, tmp_path, monkeypatch, target,
                                                                  embed):
    """Above EMBED_EXTERNAL_THRESHOLD the embedding table goes to embed.onnx.data (onnxruntime maps it and
    reads only the gathered rows; inline, it keeps the whole protobuf resident). The tiny table is pushed
    over a threshold of 0: the package lists and digests the data file and runs the same greedy tokens."""
    from llava_edge.export import onnx_export

    monkeypatch.setattr(onnx_export, "EMBED_EXTERNAL_THRESHOLD", 0)
    ck, out = str(tiny_models[PRESET]["checkpoint"]), tmp_path / "p"
    r = runner.invoke(app, ["export", ck, "-o", str(out), "--target", target])
    assert r.exit_code == 0, r.output
    m = load_manifest(out)
    assert m.extra["embed"] == embed and m.graphs["embed"].external_data == ["embed.onnx.data"]
    assert "embed.onnx.data" in m.digests
    assert (out / "embed.onnx").stat().st_size < 4096 < (out / "embed.onnx.data").stat().st_size
    assert not load_manifest(packages[target]).graphs["embed"].external_data  # the default: inline when small
    r = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    image = _image(tmp_path)
    assert _tokens(out, image) == _tokens(packages[target], image)

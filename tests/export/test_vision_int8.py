"""`export --vision int8|int8-blocked`: the vision graph's MatMuls become int8, the export check holds it
to the fp32 tower (and refuses a graph with one wrong scale or misordered codes), the package runs
through the unchanged runtime with the fp32 package's answers, and `inspect` says what it holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.export import vision_int8
from llava_edge.export.verify import session
from llava_edge.package import load_manifest

ASSET = Path(__file__).resolve().parents[2] / "llava_edge" / "assets" / "tiny_llava"
pytestmark = pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="trained asset not shipped")
runner = CliRunner()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The shipped trained tiny LLaVA exported with the fp32 and the int8 vision tower (CLI)."""
    root = tmp_path_factory.mktemp("vision_int8")
    for v in ("fp32", "int8"):
        r = runner.invoke(app, ["export", str(ASSET), "-o", str(root / v), "--vision", v])
        assert r.exit_code == 0, r.output
    return root


def _features(pkg: Path, pixels: np.ndarray) -> np.ndarray:
    return session(pkg / "vision.onnx").run(None, {"pixel_values": pixels})[0]


def _scene_pixels(pkg: Path, n: int) -> np.ndarray:
    from llava_edge.runtime.preprocess import preprocess
    from llava_edge.synthetic import data as D

    vision = load_manifest(pkg).vision
    return np.stack([preprocess(D.generate_sample(D.HELDOUT_SEED, i).image, vision) for i in range(n)])


def test_int8_graph_is_int8_and_within_tolerance_of_fp32(packages):
    m = load_manifest(packages / "int8")
    vq = m.extra["vision_quant"]
    assert vq["option"] == "int8" and vq["method"] == "dynamic" and vq["quantized"] == 20  # 3 layers x 6 + projector 2
    assert vq["relative_error"] <= vision_int8.RELATIVE_TOLERANCE and vq["weight_error"] <= vision_int8.WEIGHT_TOLERANCE
    assert "vision_quant" not in load_manifest(packages / "fp32").extra
    graph = onnx.load(str(packages / "int8" / "vision.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 20 and ops.count("Conv") == 1  # patch conv stays fp32
    inits = {t.name for t in graph.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in graph.graph.node)
    assert m.graphs["vision"].external_data == ["vision.onnx.data"]  # mapped, not kept twice (vision_int8)
    assert m.graphs["vision"].size_bytes < 0.5 * load_manifest(packages / "fp32").graphs["vision"].size_bytes
    # independently of the export's own check: real scenes of the task, int8 vs the fp32 graph
    pixels = _scene_pixels(packages / "fp32", 4)
    want = _features(packages / "fp32", pixels)
    assert vision_int8.relative_error(_features(packages / "int8", pixels), want) <= vision_int8.RELATIVE_TOLERANCE


def _check_inputs(pkg: Path, tmp_path: Path):
    """A copy of the fp32 vision graph and the export check's inputs; the fp32 graph's outputs stand in
    for torch's (export verified them to 1e-5)."""
    shutil.copy(pkg / "vision.onnx", tmp_path / "vision.onnx")
    spec = load_manifest(pkg).graphs["vision"]
    x = np.random.default_rng(0).standard_normal((3, 3, 72, 72)).astype(np.float32)
    import torch

    return spec, (torch.from_numpy(x),), [_features(pkg, x)]


@pytest.mark.parametrize("option", ["int8", "int8-blocked"])
@pytest.mark.parametrize("fault", ["none", "projector scale x2", "one q_proj scale x2", "codes reversed"])
def test_export_check_refuses_a_wrong_scale_or_packing(packages, tmp_path, monkeypatch, option, fault):
    spec, inputs, want = _check_inputs(packages / "fp32", tmp_path)
    real = vision_int8.quantize_vision

    def broken(src, dst, cfg=None):
        cfg = real(src, dst, cfg)
        model = onnx.load(str(dst))
        for t in model.graph.initializer:
            hit = {"projector scale x2": t.name == "projector.linear_2.weight_t_scale",
                   "one q_proj scale x2": t.name == "tower.encoder.layers.1.self_attn.q_proj.weight_t_scale",
                   "codes reversed": t.name == "tower.encoder.layers.0.mlp.fc1.weight_t_quantized"}.get(fault)
            if hit:
                a = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(a * 2 if "x2" in fault else a.reshape(-1)[::-1].reshape(a.shape),
                                                   t.name))
        onnx.save(model, str(dst))
        return cfg

    monkeypatch.setattr(vision_int8, "quantize_vision", broken)
    if fault == "none":
        q = vision_int8.quantize_checked(tmp_path, spec, inputs, want, option)
        assert q.relative_error <= 0.02 and q.weight_error <= 0.02  # measured ~0.007: far below both bounds
        return
    with pytest.raises(vision_int8.VisionQuantError, match="relative") as e:
        vision_int8.quantize_checked(tmp_path, spec, inputs, want, option)
    if fault == "one q_proj scale x2":  # end to end this one costs ~0.05 only: the weight check catches it
        assert "q_proj" in str(e.value)


def _answers(pkg: Path, n: int) -> list[list[int]]:
    from llava_edge.runtime.pipeline import Pipeline
    from llava_edge.synthetic import data as D

    pipe = Pipeline.from_package(pkg, backend="ort")
    out = []
    for i in range(n):
        s = D.generate_sample(D.HELDOUT_SEED, i)
        out += [pipe.generate(s.image, t.question, max_new_tokens=8).token_ids for t in s.turns]
    return out


def test_int8_vision_gives_fp32_vision_greedy_tokens(packages):
    want, got = _answers(packages / "fp32", 3), _answers(packages / "int8", 3)
    assert len(want) >= 15 and got == want


def test_cli_run_and_inspect_int8_package(packages, tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(img)
    r = runner.invoke(app, ["run", str(packages / "int8"), "--image", str(img), "--prompt", "how many shapes?",
                            "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["token_ids"]
    r = runner.invoke(app, ["inspect", str(packages / "int8")])
    rel = load_manifest(packages / "int8").extra["vision_quant"]["relative_error"]
    line = f"vision weights: int8 (dynamic, 20 MatMuls; relative error vs the fp32 tower {rel:.2e})"
    assert r.exit_code == 0 and line in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["inspect", str(packages / "fp32")])
    assert "vision weights: float32" in r.output, r.output


def test_cli_refuses_int8_vision_with_fp16(tmp_path):  # an unknown --vision: tests/robust/test_errors.py
    r = runner.invoke(app, ["export", str(ASSET), "-o", str(tmp_path / "p"), "--vision", "int8", "--dtype", "fp16"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "needs --dtype fp32" in r.output, r.output
    assert not (tmp_path / "p").exists()


def test_vision_ab_benchmark_writes_both_rewrites_and_times_them(packages, tmp_path):
    from llava_edge.benchmarks import vision_ab

    md = tmp_path / "ab.md"
    vision_ab.main([str(packages / "fp32"), "--out", str(tmp_path / "graphs"), "--reps", "2", "--no-memory",
                    "--md", str(md)])
    rows = {line.split("|")[1].strip(): line.split("|")
            for line in md.read_text().splitlines() if line.startswith("| ")}
    assert {"fp32", "int8", "int8-blocked"} <= set(rows)
    for name in ("int8", "int8-blocked"):
        assert 0.0 < float(rows[name][4]) <= vision_int8.RELATIVE_TOLERANCE  # relative error vs the fp32 graph
        assert (tmp_path / "graphs" / name / "vision.onnx.data").is_file()


def test_tensorrt_plan_refuses_int8_vision_and_says_how_to_export(packages):
    r = runner.invoke(app, ["build", str(packages / "int8"), "--dry-run", "--trt-version", "10.3"])
    assert r.exit_code == 2 and "MatMulInteger" in r.output, r.output
    assert "export the package with --vision fp32 for TensorRT" in " ".join(r.output.split()), r.output

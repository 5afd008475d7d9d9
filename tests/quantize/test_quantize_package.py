"""End to end on a tiny exported LLaVA package: calibrate with images, quantize, write both graph
formats, compare against the float package in onnxruntime."""

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

from llava_edge.quantize import quantize as quantize_mod
from llava_edge.quantize.capture import encode_samples
from llava_edge.quantize.data import load_calibration
from llava_edge.quantize.gptq_import import to_autogptq
from llava_edge.quantize.onnx_writer import write_quantized_decoder
from llava_edge.packing import dequantize_packed
from llava_edge.quantize.options import QuantizeOptions
from llava_edge.quantize.quantize import QuantizeError, quantize_package
from llava_edge.quantize.report import PackageRunner
from llava_edge.package import PackageError, load_manifest, write_manifest

OPTS = QuantizeOptions(samples=12, holdout=3, group_size=32)
QUIET = dict(progress=False, print_report=False)


@pytest.fixture(scope="module")
def gptq_pkg(fp_package, tmp_path_factory):
    pkg, ckpt = fp_package
    return quantize_package(pkg, ckpt, tmp_path_factory.mktemp("q") / "gptq", OPTS, **QUIET)


@pytest.fixture(scope="module")
def holdout_samples(fp_package):
    pkg, _ = fp_package
    m = load_manifest(pkg)
    from tokenizers import Tokenizer

    convs = load_calibration(None, 3, seed=7)
    return encode_samples(convs, Tokenizer.from_file(str(pkg / "tokenizer.json")), m.text, m.vision)


def test_quantized_package_is_a_runnable_package(gptq_pkg, fp_package):
    from llava_edge.quantize.data import shapes_sample
    from llava_edge.runtime.pipeline import Pipeline

    m = load_manifest(gptq_pkg.package_dir)
    q = m.quantization
    assert (q["method"], q["bits"], q["group_size"], q["format"], q["samples"]) == ("gptq", 4, 32, "matmulnbits", 12)
    assert q["act_order"] is True and q["quantized_linears"] == 14 and q["lm_head"] is False
    assert q["report"]["logits_n_prompts"] == 3
    report = json.loads((gptq_pkg.package_dir / "quantization_report.json").read_text())
    assert len(report["layer_errors"]) == 2
    out = Pipeline.from_package(gptq_pkg.package_dir).generate(shapes_sample(0, 1).image, "What is it?",
                                                               max_new_tokens=3)
    assert len(out.token_ids) >= 1
    assert not any(p.name.startswith(".") for p in gptq_pkg.package_dir.parent.iterdir())


def test_matmulnbits_graph_holds_exactly_the_quantized_weights(gptq_pkg):
    model = onnx.load(str(gptq_pkg.package_dir / "decoder.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14 and not any(n.endswith("weight_t") and n.startswith("layers") for n in inits)
    for node in nodes:
        assert len(node.input) == 3  # A, B, scales: no zero points, no g_idx
        attrs = {a.name: a.i for a in node.attribute}
        key = node.input[1][: -len(".qweight")]
        ql = gptq_pkg.quantized[key]
        assert attrs == {"K": ql.shape[1], "N": ql.shape[0], "bits": 4, "block_size": 32}
        b = inits[node.input[1]].reshape(attrs["N"], -1)
        deq = dequantize_packed(b, inits[node.input[2]], 4, 32)
        assert np.array_equal(deq, ql.dequantize().numpy())
    assert "lm_head.weight_t" in inits  # lm_head stays float unless asked


def test_both_writers_give_the_same_logits(gptq_pkg, fp_package, holdout_samples, tmp_path):
    qdq = tmp_path / "qdq"
    shutil.copytree(gptq_pkg.package_dir, qdq)
    write_quantized_decoder(fp_package[0] / "decoder.onnx", qdq / "decoder.onnx", gptq_pkg.quantized, "qdq")
    m = load_manifest(qdq, check_files=False)
    write_manifest(qdq, m)
    model = onnx.load(str(qdq / "decoder.onnx"))
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14 and all(len(n.input) == 2 for n in dq)
    assert all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": 32} for n in dq)
    a, b = PackageRunner(gptq_pkg.package_dir), PackageRunner(qdq)
    for s in holdout_samples:
        la, lb = a.logits(s), b.logits(s)
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4 * float(np.abs(la).max()))


def test_gptq_beats_rtn_and_int8_is_close_to_fp(fp_package, gptq_pkg, tmp_path):
    pkg, ckpt = fp_package
    rtn = quantize_package(pkg, ckpt, tmp_path / "rtn", replace(OPTS, method="rtn"), **QUIET)
    int8 = quantize_package(pkg, ckpt, tmp_path / "int8", replace(OPTS, method="rtn", bits=8), **QUIET)
    g, r, e = gptq_pkg.report, rtn.report, int8.report
    assert g.mean_ratio() < 0.85  # per-layer GPTQ/RTN error on held-out inputs
    assert g.logits.mean_kl < r.logits.mean_kl and g.logits.rel_rms_error < r.logits.rel_rms_error
    assert g.logits.top1_agreement >= r.logits.top1_agreement
    assert e.logits.rel_rms_error < 0.05 and e.logits.rel_rms_error < g.logits.rel_rms_error / 4
    assert e.logits.top1_agreement > 0.9
    assert 0.25 < g.sizes["linear_vs_fp16_ratio"] < 0.25 + 2 / 32 + 1e-9


def test_interrupted_quantize_leaves_nothing(fp_package, tmp_path, monkeypatch):
    pkg, ckpt = fp_package

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_mod, "write_quantized_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_package(pkg, ckpt, tmp_path / "out", replace(OPTS, method="rtn"), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_options_and_quantized_input(gptq_pkg, fp_package, tmp_path):
    pkg, ckpt = fp_package
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_package(gptq_pkg.package_dir, ckpt, tmp_path / "x", OPTS, **QUIET)
    with pytest.raises(QuantizeError, match="--checkpoint"):
        quantize_package(pkg, None, tmp_path / "x", OPTS, **QUIET)
    with pytest.raises(PackageError):
        quantize_package(tmp_path / "nope", ckpt, tmp_path / "x", OPTS, **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_import_desc_act_gptq_checkpoint_end_to_end(gptq_pkg, fp_package, holdout_samples, tmp_path):
    """An AutoGPTQ v1 desc_act checkpoint: its weights (permuted input channels per Linear) are
    put into a float copy of the package as reference; the imported package must match it."""
    pkg, _ = fp_package
    rng = np.random.default_rng(0)
    tensors, ref_weights = {}, {}
    for key, ql in gptq_pkg.quantized.items():
        k = ql.shape[1]
        perm = rng.permutation(k)
        g_idx = np.empty(k, np.int32)
        g_idx[perm] = np.arange(k) // 32  # original channel perm[j] sits in group j // 32
        inv = np.argsort(perm)
        fp16 = ql.scales.half().float()
        permuted = type(ql)(ql.q[:, inv], fp16, 4, 32)  # codes in original channel order
        t = to_autogptq(permuted, v1=True, g_idx=g_idx)
        t["scales"] = np.ascontiguousarray(fp16.numpy().T.astype(np.float16))
        module = "model.language_model." + key.replace("q_proj", "self_attn.q_proj").replace(
            "k_proj", "self_attn.k_proj").replace("v_proj", "self_attn.v_proj").replace("o_proj", "self_attn.o_proj")
        tensors.update({f"{module}.{p}": v for p, v in t.items()})
        w = np.empty((ql.shape[0], k), np.float32)
        w[:, perm] = (ql.q.float() * fp16.repeat_interleave(32, 1)).numpy()
        ref_weights[key] = w
    ck = tmp_path / "gptq_ck"
    ck.mkdir()
    save_file(tensors, str(ck / "model.safetensors"))
    (ck / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4, "group_size": 32, "desc_act": True,
                                                                        "sym": True, "quant_method": "gptq"}}))
    imp = quantize_package(pkg, None, tmp_path / "imported", QuantizeOptions(from_gptq=ck, samples=1, holdout=0),
                           progress=False, print_report=False)
    assert imp.manifest.quantization["method"] == "gptq-import"
    graph = onnx.load(str(imp.package_dir / "decoder.onnx")).graph
    assert sum(n.op_type == "Gather" and n.name.endswith("_input_perm") for n in graph.node) == 12  # down_proj folded

    ref = tmp_path / "ref"
    shutil.copytree(pkg, ref)
    model = onnx.load(str(ref / "decoder.onnx"))
    for init in model.graph.initializer:
        key = init.name[: -len(".weight_t")]
        if key in ref_weights:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(ref_weights[key].T), init.name))
    onnx.save(model, str(ref / "decoder.onnx"))
    write_manifest(ref, load_manifest(ref, check_files=False))
    a, b = PackageRunner(ref), PackageRunner(imp.package_dir)
    for s in holdout_samples:
        la, lb = a.logits(s), b.logits(s)
        np.testing.assert_allclose(lb, la, rtol=0, atol=1e-4 * float(np.abs(la).max()))
    assert torch.is_tensor(imp.quantized["layers.0.q_proj"].perm)


def test_gptq_into_the_fused_fast_decoder(fp_package, tmp_path):
    """The fast decoder stacks q/k/v and gate/up into one weight each; quantize stacks their GPTQ codes
    the same way, so the quantized fast graph computes what the quantized portable graph computes."""
    from llava_edge.export.fast_decoder import export_fast_decoder
    from llava_edge.runtime.pipeline import Pipeline
    from PIL import Image

    pkg, ckpt = fp_package
    src = tmp_path / "src"
    shutil.copytree(pkg, src)
    export_fast_decoder(ckpt, src)
    out = tmp_path / "gptq"
    res = quantize_package(src, ckpt, out, OPTS, **QUIET)
    nodes = onnx.load(str(out / "decoder_fast.onnx"), load_external_data=False).graph.node
    kinds = sorted(n.input[1].rsplit(".", 2)[-2] for n in nodes if n.op_type == "MatMulNBits")
    layers = load_manifest(out).text.num_layers
    assert kinds == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] * layers)
    assert not any(n.op_type == "MatMul" and "layers." in n.input[1] for n in nodes)  # nothing left in float
    assert len(res.quantized) == 7 * layers

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    portable = Pipeline.from_package(out, backend="ort")
    fast = Pipeline.from_package(out, backend="ort-fast")
    for prompt in ("What is in the picture?", "Describe the colors."):
        want = portable.generate(image, prompt, max_new_tokens=12)
        got = fast.generate(image, prompt, max_new_tokens=12)
        assert got.token_ids == want.token_ids

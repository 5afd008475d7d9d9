"""Checkpoint layouts and export failure modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_edge.export.checkpoint import CheckpointError, load_checkpoint


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset", ["llava-hf-v1.5", "llava-hf-gqa", "original-v1"])
def test_loader_reads_what_the_factory_wrote(tiny_models, preset):
    m = tiny_models[preset]
    ck = load_checkpoint(m["checkpoint"])
    _same_weights(ck.model, m["model"])
    assert ck.layout == ("original" if preset.startswith("original") else "llava-hf")
    assert ck.tokenizer.token_to_id("<image>") == ck.image_token_id


def test_hub_key_layout_loads(tiny_models, tmp_path):
    """llava-hf files on the hub say language_model.model.* and vision_tower.vision_model.*."""
    src = tiny_models["llava-hf-v1.5"]["checkpoint"]
    dst = tmp_path / "hub"
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]) if k.startswith("vision_tower.") else k: v
               for k, v in state.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in renamed)
    save_file(renamed, dst / "model.safetensors")
    _same_weights(load_checkpoint(dst).model, tiny_models["llava-hf-v1.5"]["model"])


def test_missing_weight_is_named(tiny_models, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_models["llava-hf-v1.5"]["checkpoint"], dst)
    state = load_file(dst / "model.safetensors")
    state = {k: v for k, v in state.items() if "layers.1.mlp.down_proj" not in k}
    save_file(state, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj"):
        load_checkpoint(dst)


def test_original_without_local_vision_tower(tiny_models, tmp_path):
    dst = tmp_path / "orig"
    shutil.copytree(tiny_models["original-v1"]["checkpoint"], dst)
    shutil.rmtree(dst / "clip-vision")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="--vision-tower"):
        load_checkpoint(dst)
    # pointing at a local copy works
    shutil.copytree(tiny_models["original-v1"]["checkpoint"] / "clip-vision", tmp_path / "clip")
    _same_weights(load_checkpoint(dst, vision_tower=tmp_path / "clip").model, tiny_models["original-v1"]["model"])


def test_missing_weights_file(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}, "text_config": {}}))
    with pytest.raises(CheckpointError):
        load_checkpoint(d)


def test_interrupted_export_leaves_no_package(tiny_models, tmp_path, monkeypatch):
    from llava_edge.export import exporter

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_package(tiny_models["llava-hf-gqa"]["checkpoint"], tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_fp16_export_tracks_fp32(tiny_models, tmp_path, images):
    from llava_edge.export.exporter import export_package
    from llava_edge.runtime.pipeline import Pipeline

    res = export_package(tiny_models["llava-hf-gqa"]["checkpoint"], tmp_path / "fp16", dtype="fp16")
    assert res.manifest.dtype == "float16"
    assert res.errors["pipeline_logits"] < 5e-2
    p16 = Pipeline.from_package(tmp_path / "fp16")
    p32 = Pipeline.from_package(tiny_models["llava-hf-gqa"]["package"])
    a = p16.generate(images["landscape"], "What is this?", max_new_tokens=8)
    b = p32.generate(images["landscape"], "What is this?", max_new_tokens=8)
    assert a.token_ids[:4] == b.token_ids[:4]


def test_fp16_export_without_room_for_an_fp32_reference(tiny_models, tmp_path, monkeypatch):
    """Big checkpoints on small machines load once, in fp16, and verify against transformers in fp16."""
    from llava_edge.export import exporter

    monkeypatch.setattr(exporter, "_fits_in_memory", lambda n: False)
    res = exporter.export_package(tiny_models["original-v1"]["checkpoint"], tmp_path / "p", dtype="fp16")
    assert res.manifest.extra["reference_dtype"] == "float16"
    assert res.errors["pipeline_logits"] < 5e-2


def test_large_decoder_goes_to_one_external_file_and_nothing_else(tiny_models, tmp_path, monkeypatch):
    """Above the threshold weights move to decoder.onnx.data; no stray per-tensor files remain."""
    from llava_edge.export import onnx_export
    from llava_edge.export.exporter import export_package
    from llava_edge.package import load_manifest

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
    export_package(tiny_models["llava-hf-gqa"]["checkpoint"], tmp_path / "p")
    m = load_manifest(tmp_path / "p")
    assert m.graphs["decoder"].external_data == ["decoder.onnx.data"]
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    expected = {"manifest.json", "tokenizer.json"}
    for g in m.graphs.values():
        expected |= {g.file, *g.external_data}
    assert set(names) == expected, names


def test_weights_are_converted_one_tensor_at_a_time_and_a_truncated_file_is_named(tiny_models, tmp_path):
    """An fp16 checkpoint loaded as fp32 (export's reference) or fp16 holds exactly the file's values, converted;
    a truncated weights file is one CheckpointError naming it."""
    src = tiny_models["llava-hf-gqa"]["checkpoint"]
    ck = tmp_path / "fp16"
    shutil.copytree(src, ck)
    state = load_file(ck / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, ck / "model.safetensors")
    half = load_checkpoint(ck, dtype=torch.float16).model
    full = load_checkpoint(ck).model
    assert all(p.dtype == torch.float32 for p in full.parameters())
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.equal(a, b.float()), name
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights .*model.safetensors"):
        load_checkpoint(ck)


@pytest.mark.parametrize("target", ["portable", "cpu-int4"])
def test_no_decoder_graph_is_loaded_beside_the_torch_model(tiny_models, tmp_path, monkeypatch, target):
    """Export computes torch's side of every check first and frees the model before onnxruntime opens a
    decoder graph (a 7B decoder session beside the 7B torch model would double the peak)."""
    import gc
    import weakref

    from llava_edge.export import exporter, verify
    from llava_edge.runtime import fast_backend

    alive = []
    real_load, real_session, real_open = exporter.load_checkpoint, verify.session, fast_backend.open_session
    real_reference = exporter.reference_model

    def load(*a, **k):
        ck = real_load(*a, **k)
        alive.append(weakref.ref(ck.model))
        return ck

    def reference(*a, **k):  # the cpu targets' transformers reference (the model's first layers, or all)
        model = real_reference(*a, **k)
        alive.append(weakref.ref(model))
        return model

    opened = []

    def check(name):
        gc.collect()
        if name.startswith("decoder"):
            assert alive and all(a() is None for a in alive), f"{name} opened while a torch model is alive"
            opened.append(name)

    monkeypatch.setattr(exporter, "load_checkpoint", load)
    monkeypatch.setattr(exporter, "reference_model", reference)
    monkeypatch.setattr(verify, "session", lambda path: check(path.name) or real_session(path))
    monkeypatch.setattr(fast_backend, "open_session",
                        lambda root, m, graph, *a: check(graph) or real_open(root, m, graph, *a))
    exporter.export_package(tiny_models["llava-hf-gqa"]["checkpoint"], tmp_path / "p", target=target)
    assert len(alive) == (1 if target == "portable" else 2)
    assert opened == (["decoder.onnx"] * 2 if target == "portable" else
                      ["decoder_fast", "decoder_fast_int4_twin", "decoder_fast_int4"])

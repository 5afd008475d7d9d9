"""Export in O(one layer) of memory: the cpu targets write the fast decoder from the checkpoint a tensor at a
time (export/lazy.py), with the same bytes as from a loaded model; the decoder is never loaded whole; and
the layer-sized check (the first N layers against transformers truncated to them, the shipped graph
holding their weights byte for byte) catches a wrong weight."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.export import exporter, lazy
from llava_edge.export.checkpoint import TensorRef, is_decoder_key, load_checkpoint
from llava_edge.export.exporter import ExportError, export_package
from llava_edge.export.factory import PRESETS, build_checkpoint
from llava_edge.export.fast_decoder import FastDecoderConfig, build_fast_decoder
from llava_edge.export.verify import weights_not_in
from llava_edge.package import load_manifest

LAYERS = 4


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """The GQA tiny model with 4 decoder layers, so that a 1-layer check holds a quarter of the decoder."""
    ck = tmp_path_factory.mktemp("deep") / "ck"
    build_checkpoint(ck, dataclasses.replace(PRESETS["llava-hf-gqa"], layers=LAYERS))
    return ck


@pytest.mark.parametrize("preset", ["llava-hf-gqa", "original-v1", "llava-phi3"])
def test_lazy_view_writes_the_same_graph_bytes_as_the_loaded_model(tiny_models, tmp_path, preset):
    """float and int4: the graph and its weights file are byte-identical either way (llava-hf and original
    layouts; Phi-3's fused projections split in the view). fp16: every weight identical but the rotary
    tables, which the view computes from the fp32 inverse frequencies (a model converted to fp16 rounds
    that buffer to fp16 first)."""
    ck = tiny_models[preset]["checkpoint"] if preset in tiny_models else tmp_path / "ck"
    if preset not in tiny_models:
        build_checkpoint(ck, preset)
    eager, partial = load_checkpoint(ck), load_checkpoint(ck, lazy_decoder=True)
    assert partial.deferred and all(p.is_meta for k, p in partial.model.state_dict().items() if is_decoder_key(k))
    for dtype in (torch.float32, torch.float16):
        model = eager.model if dtype == torch.float32 else eager.model.to(dtype)
        for quant in (None, "int4-rtn"):
            cfg = FastDecoderConfig(dtype=str(dtype).replace("torch.", ""), quant=quant)
            specs = {}
            for way, source in (("eager", model), ("lazy", lazy.LazyLlava(partial, dtype))):
                (tmp_path / way).mkdir(exist_ok=True)
                specs[way] = build_fast_decoder(source, tmp_path / way / "d.onnx", cfg)
                specs[way].file = f"{way}/d.onnx"
            if dtype == torch.float32:
                for name in ("d.onnx", "d.onnx.data"):
                    assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "lazy" / name).read_bytes(), \
                        (quant, name)
            else:
                assert weights_not_in(tmp_path, specs["lazy"], specs["eager"]) == ["rotary.cos_cache",
                                                                                    "rotary.sin_cache"]
def test_reference_model_equals_the_loaded_model_truncated(deep_checkpoint):
    full = load_checkpoint(deep_checkpoint).model
    ref = lazy.reference_model(load_checkpoint(deep_checkpoint, lazy_decoder=True), 2)
    assert len(ref.model.language_model.layers) == 2
    want = full.state_dict()
    got = ref.state_dict()
    assert not any(".layers.2." in k for k in got if "language_model" in k)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def test_export_never_holds_the_decoder(deep_checkpoint, tmp_path, monkeypatch):
    """The loaded model holds no decoder weight, and the decoder tensors alive at any one time (read from
    the file by the graph builder and the truncated reference) stay below one layer + lm_head + norms:
    far below the whole decoder. Loading the decoder whole (the eager path) fails the first assertion."""
    loaded, live, peak = [], [0], [0]
    real_load, real_read = exporter.load_checkpoint, TensorRef.read

    def load(*a, **k):
        ck = real_load(*a, **k)
        loaded.append({k: p.is_meta for k, p in ck.model.state_dict().items() if is_decoder_key(k)})
        return ck

    def read(self, *a, **k):
        t = real_read(self, *a, **k)
        n = t.numel() * t.element_size()
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
        return t

    monkeypatch.setattr(exporter, "load_checkpoint", load)
    monkeypatch.setattr(TensorRef, "read", read)
    result = export_package(deep_checkpoint, tmp_path / "pkg", target="cpu-int4", check_layers=1)
    assert loaded and loaded[0] and all(loaded[0].values())  # every decoder parameter stayed on meta
    ck = load_checkpoint(deep_checkpoint, lazy_decoder=True)
    size = {k: 4 * torch.Size(r.shape).numel() for k, r in ck.deferred.items()}  # fp32 bytes
    layer0 = sum(v for k, v in size.items() if ".layers.0." in k)
    head = sum(v for k, v in size.items() if ".layers." not in k)  # lm_head, final norm
    assert 0 < peak[0] <= layer0 + head < sum(size.values()) / 2, (peak[0], layer0, head, sum(size.values()))
    scope = result.manifest.extra["verification_scope"]
    assert scope["layers_checked"] == 1 and scope["num_layers"] == LAYERS and "finite" in scope["full_graph"]
    assert list(result.manifest.graphs) == ["vision", "embed", "decoder_fast_int4"]


def _corrupt(layer_of, key: str):
    """A LazyLlava.__init__ that scales one projection's weight of the views selected by layer_of(n)."""
    real_init = lazy.LazyLlava.__init__

    def init(self, ck, dtype, num_layers=None):
        real_init(self, ck, dtype, num_layers)
        if layer_of(num_layers):
            mlp = self.model.language_model.layers[0].mlp
            good = getattr(mlp, key)
            bad = type("Bad", (), {"weight": property(lambda s: good.weight * 1.5), "bias": None,
                                   "out_features": good.out_features, "in_features": good.in_features})()
            setattr(mlp, key, bad)
    return init


@pytest.mark.parametrize("target", ["cpu", "cpu-int4"])
def test_the_layer_check_catches_a_wrong_weight_in_the_view(deep_checkpoint, tmp_path, monkeypatch, target):
    """A view that reads one wrong tensor (layer 0's down_proj scaled) for every graph: the checked graphs
    differ from transformers, which reads the tensors by their own names."""
    monkeypatch.setattr(lazy.LazyLlava, "__init__", _corrupt(lambda n: True, "down_proj"))
    with pytest.raises(ExportError, match="differs from transformers"):
        export_package(deep_checkpoint, tmp_path / "pkg", target=target, check_layers=1)
    assert not (tmp_path / "pkg").exists()


def test_the_shipped_graph_must_hold_the_checked_weights(deep_checkpoint, tmp_path, monkeypatch):
    """Only the whole decoder's view reads the wrong tensor: the checked 1-layer graphs pass, and the byte
    comparison of the shipped graph with them fails."""
    monkeypatch.setattr(lazy.LazyLlava, "__init__", _corrupt(lambda n: n is None, "up_proj"))
    with pytest.raises(ExportError, match="does not hold the checked graph.s weights: layers.0.mlp.gate_up_proj"):
        export_package(deep_checkpoint, tmp_path / "pkg", target="cpu-int4", check_layers=1)


def test_check_layers_is_for_the_cpu_targets(deep_checkpoint, tmp_path):
    r = CliRunner().invoke(app, ["export", str(deep_checkpoint), "-o", str(tmp_path / "p"), "--check-layers", "1"])
    assert r.exit_code == 2 and "--check-layers N (N >= 1) is for --target cpu or cpu-int4" in r.output
    # all layers checked (the default when the model fits): no truncated graphs, no byte comparison
    result = export_package(deep_checkpoint, tmp_path / "full", target="cpu")
    assert result.manifest.extra["verification_scope"] == {"layers_checked": LAYERS, "num_layers": LAYERS}
    assert load_manifest(tmp_path / "full").extra["verification"]["decoder_fast_logits"] < 1e-3

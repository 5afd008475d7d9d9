"""The attention choice per TensorRT version: which decoder graph `llava-edge build` uses, what the dry run
reports, TensorRT's op check on the plugin-attention graph. `--plugins auto` picks the plugin graph from
10.9 (the runtime binds it: tests/runtime/test_trt_plugin_backend.py). No TensorRT needed (plans only)."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.trt import ops as trt_ops
from llava_edge.trt.plugin_decoder import make_plugin_decoder
from llava_edge.trt.builder import _engine_source
from llava_edge.trt.plan import EngineBuildError, plan_build
from llava_edge.package import load_manifest


@pytest.mark.parametrize("version,plugins,graph,attention", [
    ("10.3", "auto", "static", "standard"),
    ("10.3", "off", "static", "standard"),
    ("10.9", "on", "plugin", "plugin"),
    ("10.9", "auto", "plugin", "plugin"),
    ("10.9", "off", "static", "standard"),
    ("10.15", "on", "plugin", "plugin"),
    ("10.15", "auto", "plugin", "plugin"),
    ("11.0", "on", "plugin", "plugin"),
    ("11.0", "auto", "plugin", "plugin"),
    ("11.0", "off", "static", "standard"),
])
def test_decoder_graph_per_version(plugin_package, version, plugins, graph, attention):
    p = plan_build(plugin_package, version, "datacenter", plugins=plugins)
    assert p.decoder_graph == graph and p.attention == attention
    assert f"decoder graph: {graph}" in p.describe()
    assert p.checks["decoder"].ok
    if graph == "plugin":
        assert p.register_plugins and p.checks["decoder"].plugins == ["prefill_attention"]
        names = set(p.profiles["decoder"][0].shapes)
        assert {"prompt_lens", "start_pos"} <= names and "attention_mask" not in names
        assert p.profiles["decoder"][1].shapes["inputs_embeds"][2][1] == 1  # decode profile: one token
        assert p.memory.kv_staging == 0  # the plugin writes the cache itself
    else:
        assert not p.checks["decoder"].plugins and "attention_mask" in p.profiles["decoder"][0].shapes
        assert p.memory.kv_staging > 0  # the static graph returns new k/v for the runtime to copy in


def test_auto_keeps_standard_ops_without_the_kernels_extra(plugin_package, monkeypatch):
    """A runtime-only install (no triton/torch to AOT-compile the plugins) still builds under auto;
    --plugins on does not fall back (it fails later, at registration, with the import error)."""
    from llava_edge.trt import plan as trt_plan

    monkeypatch.setattr(trt_plan, "_missing_kernel_modules", lambda: ["triton"])
    p = plan_build(plugin_package, "11.0", "datacenter", plugins="auto")
    assert p.decoder_graph == "static" and p.attention == "standard"
    assert any("needs triton at build time" in n for n in p.notes)
    assert plan_build(plugin_package, "11.0", "datacenter", plugins="on").decoder_graph == "plugin"


def test_auto_falls_back_when_the_kernels_cannot_take_the_model(trt_package):
    """head_dim 16 (below the kernels' 32): auto builds the static-cache graph and says why; on refuses."""
    p = plan_build(trt_package, "10.15", "datacenter", plugins="auto")
    assert p.decoder_graph == "static" and p.attention == "standard"
    assert any("plugin attention not possible" in n and "head_dim 16" in n for n in p.notes)


def test_plugins_on_refusals(plugin_package, trt_package):
    with pytest.raises(EngineBuildError, match="needs TensorRT >= 10.9"):
        plan_build(plugin_package, "10.3", "datacenter", plugins="on")
    with pytest.raises(EngineBuildError, match="ping-pong"):
        plan_build(plugin_package, "10.15", "datacenter", plugins="on", kv_cache="ping-pong")
    with pytest.raises(EngineBuildError, match="head_dim 16"):  # the kernels need head_dim >= 32
        plan_build(trt_package, "10.15", "datacenter", plugins="on")


def test_trt_op_check_on_the_plugin_graph(plugin_package):
    m = load_manifest(plugin_package)
    t = m.text
    model = onnx.load(str(plugin_package / m.graphs["decoder"].file), load_external_data=False)
    for kind in ("prefill", "decode"):
        from llava_edge.trt.plugin_decoder import PluginDecoderConfig

        g = make_plugin_decoder(model, t.num_heads, t.num_kv_heads, t.head_dim, PluginDecoderConfig(kind=kind))
        for v in ((10, 9), (10, 15), (11, 0)):
            check = trt_ops.check_model(g, "decoder", v)
            assert check.ok, check.describe()
            assert check.plugins == [f"{kind}_attention"]
        old = trt_ops.check_model(g, "decoder", (10, 3))
        assert not old.ok
        text = old.describe()
        assert f"llava_edge::{kind}_attention plugin: needs TensorRT >= 10.9" in text and "TensorRT 10.3" in text
        assert not trt_ops.check_model(g, "decoder", (10, 15), plugins_allowed=False).ok  # --plugins off


@pytest.mark.parametrize("version,plugins,graph", [("10.3", "auto", "static"), ("10.9", "on", "plugin"),
                                                   ("10.9", "auto", "plugin"), ("10.15", "on", "plugin"),
                                                   ("11.0", "auto", "plugin"), ("11.0", "off", "static")])
def test_cli_dry_run_reports_the_choice(plugin_package, version, plugins, graph):
    r = CliRunner().invoke(app, ["build", str(plugin_package), "--target", "datacenter", "--dry-run",
                                 "--trt-version", version, "--plugins", plugins, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{\n"):])
    assert summary["decoder_graph"] == graph and summary["tensorrt"] == version
    assert summary["attention"] == ("plugin" if graph == "plugin" else "standard")


def test_engine_source_writes_the_plugin_graph_next_to_the_decoder(plugin_package):
    m = load_manifest(plugin_package)
    with _engine_source(plugin_package, m.graphs["decoder"].file, "plugin", m) as src:
        assert src.parent == plugin_package and src.name.startswith(".")
        g = onnx.load(str(src), load_external_data=False)
        assert [o.name for o in g.graph.output][:2] == ["logits", "present.0.key"]
        assert any(n.op_type == "prefill_attention" for n in g.graph.node)
    assert not src.exists()

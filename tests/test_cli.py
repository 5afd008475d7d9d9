"""The CLI as a user meets it: JSON output, determinism, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.package import load_manifest

runner = CliRunner()


def _image(tmp_path, name="cat.png", size=(40, 30)):
    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output  # one line, however long, no wrapped continuation
    text = " ".join(result.output.split())
    for n in needles:
        assert n in text, result.output


def test_run_json_is_deterministic_and_complete(tiny_models, tmp_path):
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    args = ["run", pkg, "--image", str(_image(tmp_path)), "--prompt", "What is in the picture?",
            "--max-new-tokens", "12", "--greedy", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    obj = json.loads(first.output.strip().splitlines()[-1])
    assert set(obj) >= {"text", "token_ids", "timings"}
    assert set(obj["timings"]) >= {"vision_ms", "prefill_ms", "decode_ms", "tokens_per_s"}
    assert len(obj["token_ids"]) == 12 and obj["finish_reason"] == "length"
    second = json.loads(runner.invoke(app, args).output.strip().splitlines()[-1])
    assert second["token_ids"] == obj["token_ids"]


def test_sampling_with_seed_is_reproducible_and_differs_from_greedy(tiny_models, tmp_path):
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    base = ["run", pkg, "--image", str(_image(tmp_path)), "--prompt", "hi", "--max-new-tokens", "16", "--json"]
    sample = base + ["--temperature", "1.5", "--top-p", "0.95", "--seed", "3"]
    a = json.loads(runner.invoke(app, sample).output.strip().splitlines()[-1])
    b = json.loads(runner.invoke(app, sample).output.strip().splitlines()[-1])
    g = json.loads(runner.invoke(app, base + ["--greedy"]).output.strip().splitlines()[-1])
    assert a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != g["token_ids"]


def test_missing_image(tiny_models, tmp_path):
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    r = runner.invoke(app, ["run", pkg, "--image", str(tmp_path / "nope.jpg"), "--prompt", "x"])
    _assert_user_error(r, "image not found")


def test_corrupt_image(tiny_models, tmp_path):
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    bad = tmp_path / "bad.jpg"
    good = _image(tmp_path, "good.jpg")
    bad.write_bytes(good.read_bytes()[:60])  # a truncated file with a valid header
    r = runner.invoke(app, ["run", pkg, "--image", str(bad), "--prompt", "x"])
    _assert_user_error(r, "cannot decode image")
    (tmp_path / "text.png").write_text("not an image")
    _assert_user_error(runner.invoke(app, ["run", pkg, "--image", str(tmp_path / "text.png"), "--prompt", "x"]),
                       "cannot decode image")


def test_prompt_longer_than_context(tiny_models, tmp_path):
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    r = runner.invoke(app, ["run", pkg, "--image", str(_image(tmp_path)), "--prompt", "hello " * 50,
                            "--max-new-tokens", "200"])
    _assert_user_error(r, "exceeds the model's context of 256")


def test_not_a_llava_checkpoint(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _assert_user_error(runner.invoke(app, ["export", str(d), "-o", str(tmp_path / "pkg")]), "not a LLaVA checkpoint")
    _assert_user_error(runner.invoke(app, ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "pkg")]),
                       "not found")
    assert not (tmp_path / "pkg").exists()


def test_package_from_newer_format(tiny_models, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_models["llava-hf-v1.5"]["package"], pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["format_version"] = 99
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    _assert_user_error(runner.invoke(app, ["run", str(pkg), "--prompt", "x"]), "newer than this llava-edge supports")
    _assert_user_error(runner.invoke(app, ["inspect", str(pkg)]), "newer")


def test_inspect_shows_graphs(tiny_models):
    r = runner.invoke(app, ["inspect", str(tiny_models["llava-hf-gqa"]["package"])])
    assert r.exit_code == 0, r.output
    for needle in ("vision.onnx", "embed.onnx", "decoder.onnx", "kv 2", "onnxruntime"):
        assert needle in r.output


def test_chat_multi_turn_streams_and_remembers(tiny_models, tmp_path, monkeypatch):
    """Turn 2's prompt, as the pipeline encodes it, holds turn 1's question and answer: it is turn 1's
    prompt plus the answer, followed by the new question (dropping history fails both checks)."""
    from llava_edge.runtime.pipeline import Pipeline

    encoded: list[tuple[list, list[int]]] = []
    original = Pipeline.encode_request

    def recording(self, request):
        ids = original(self, request)
        encoded.append((list(request.turns), list(ids)))
        return ids

    monkeypatch.setattr(Pipeline, "encode_request", recording)
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    r = runner.invoke(app, ["chat", pkg, "--image", str(_image(tmp_path)), "--max-new-tokens", "4"],
                      input="first question\nsecond question\n/quit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("llava>") == 2
    turns_seen: list[tuple[list, list[int]]] = []  # chat may encode a turn twice (fit check, then run)
    for turns, ids in encoded:
        if not turns_seen or turns_seen[-1][0] != turns:
            turns_seen.append((turns, ids))
    (turns1, ids1), (turns2, ids2) = turns_seen
    answer1 = turns2[0][1]
    assert turns1 == [("first question", None)]
    assert turns2 == [("first question", answer1), ("second question", None)]
    assert answer1  # the model's first answer went back into the conversation
    assert len(ids2) > len(ids1) and ids2[: len(ids1) - 2] == ids1[: len(ids1) - 2]  # turn 1 is its prefix


def test_greedy_and_temperature_conflict(tiny_models):
    r = runner.invoke(app, ["run", str(tiny_models["llava-hf-v1.5"]["package"]), "--prompt", "x", "--greedy",
                            "--temperature", "0.7"])
    _assert_user_error(r, "exclude each other")


@pytest.mark.slow
def test_demo_completes(tmp_path):
    r = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "demo done" in r.output
    assert r.output.rstrip().splitlines()[-1] == "serve it: llava-edge serve   then open http://127.0.0.1:8000/"


def test_quantize_then_run_and_inspect(tiny_models, tmp_path):
    m = tiny_models["llava-hf-gqa"]
    q = tmp_path / "int4"
    r = runner.invoke(app, ["quantize", str(m["package"]), "--checkpoint", str(m["checkpoint"]), "--samples", "4",
                            "--group-size", "32", "--method", "rtn", "-o", str(q)])
    assert r.exit_code == 0, r.output
    # output is not a terminal here: plain progress lines, per stage and for the layer loop
    assert "write package ..." in r.output and "rtn 4-bit layers: 0/" in r.output, r.output
    r = runner.invoke(app, ["run", str(q), "--image", str(_image(tmp_path)), "--prompt", "hi",
                            "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["token_ids"]) == 6
    r = runner.invoke(app, ["inspect", str(q), "--json"])
    assert json.loads(r.output)["quantization"]["bits"] == 4


def test_quantize_without_checkpoint_is_a_user_error(tiny_models, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny_models["llava-hf-gqa"]["package"]), "-o", str(tmp_path / "q")])
    _assert_user_error(r)
    assert not (tmp_path / "q").exists()


def test_build_dry_run_plans_without_tensorrt(tiny_models):
    r = runner.invoke(app, ["build", str(tiny_models["llava-hf-gqa"]["package"]), "--dry-run", "--trt-version",
                            "10.3", "--target", "orin-nano", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output[r.output.index("{"):])
    assert plan["built"] is False and plan["attention"] == "standard" and plan["memory"]["fits"] is True


def test_tensorrt_backend_without_tensorrt_is_a_user_error(tiny_models):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    pkg = str(tiny_models["llava-hf-gqa"]["package"])
    _assert_user_error(runner.invoke(app, ["build", pkg]), "TensorRT is not installed", "llava-edge[tensorrt]")
    _assert_user_error(runner.invoke(app, ["run", pkg, "--prompt", "x", "--backend", "tensorrt"]))


def test_export_fast_then_run_fast_backend_matches_portable(tiny_models, tmp_path):
    pkg = tmp_path / "pkg"
    r = runner.invoke(app, ["export", str(tiny_models["original-v1"]["checkpoint"]), "-o", str(pkg), "--fast"])
    assert r.exit_code == 0, r.output
    args = ["run", str(pkg), "--image", str(_image(tmp_path)), "--prompt", "What is it?", "--max-new-tokens", "16",
            "--json"]
    portable = json.loads(runner.invoke(app, args + ["--backend", "ort"]).output.strip().splitlines()[-1])
    fast = json.loads(runner.invoke(app, args + ["--backend", "ort-fast"]).output.strip().splitlines()[-1])
    assert fast["token_ids"] == portable["token_ids"] and len(fast["token_ids"]) == 16
    _assert_user_error(runner.invoke(app, args + ["--backend", "ort-fast-int4"]), "decoder_fast_int4",
                       f"llava-edge export {tiny_models['original-v1']['checkpoint']} -o {pkg} --fast-int4 --overwrite")


def test_run_and_chat_default_to_the_fastest_graph_in_the_package(tiny_models, tmp_path, monkeypatch):
    """No --backend: run and chat open the fast decoder when the package has one (resolve_auto)."""
    from llava_edge.runtime import backends

    pkg = tmp_path / "pkg"
    assert runner.invoke(app, ["export", str(tiny_models["llava-hf-gqa"]["checkpoint"]), "-o", str(pkg),
                               "--fast"]).exit_code == 0
    opened = []
    real = backends.open_backend

    def spy(name, *a, **k):
        backend = real(name, *a, **k)
        opened.append((name, type(backend).__name__, getattr(backend, "decoder_graph", None)))
        return backend

    monkeypatch.setattr("llava_edge.runtime.pipeline.open_backend", spy)
    r = runner.invoke(app, ["run", str(pkg), "--prompt", "hi", "--max-new-tokens", "2", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["chat", str(pkg), "--max-new-tokens", "2"], input="hi\n/quit\n")
    assert r.exit_code == 0, r.output
    assert opened == [("auto", "FastOrtBackend", "decoder_fast")] * 2
    m = load_manifest(pkg)
    assert backends.resolve_auto(pkg, m) == "ort-fast" and backends.resolve_auto(pkg, m, "cuda") == "ort"


def test_bench_writes_json_with_baseline_ratios(tiny_models, tmp_path):
    m = tiny_models["llava-hf-gqa"]
    out_json = tmp_path / "r.json"
    r = runner.invoke(app, ["bench", str(m["package"]), "--baseline", "transformers", "--checkpoint",
                            str(m["checkpoint"]), "--new-tokens", "4", "--prompt-len", "8", "--repeat", "1",
                            "--warmup", "0", "-o", str(out_json)])
    assert r.exit_code == 0, r.output
    data = json.loads(out_json.read_text())
    assert "transformers" in json.dumps(data) and "machine" in json.dumps(data)


def test_gptq_package_runs_on_the_fast_backend(tiny_models, tmp_path):
    m = tiny_models["llava-hf-gqa"]
    pkg, q = tmp_path / "pkg", tmp_path / "int4"
    assert runner.invoke(app, ["export", str(m["checkpoint"]), "-o", str(pkg), "--fast"]).exit_code == 0
    r = runner.invoke(app, ["quantize", str(pkg), "--checkpoint", str(m["checkpoint"]), "--samples", "4",
                            "--group-size", "32", "-o", str(q)])
    assert r.exit_code == 0, r.output
    graph = json.loads(runner.invoke(app, ["inspect", str(q), "--json"]).output)["graphs"]["decoder_fast"]
    assert (q / graph["file"]).read_bytes().count(b"MatMulNBits") > 0
    args = ["run", str(q), "--image", str(_image(tmp_path)), "--prompt", "What is it?", "--max-new-tokens", "12",
            "--json"]
    portable = json.loads(runner.invoke(app, args + ["--backend", "ort"]).output.strip().splitlines()[-1])
    fast = json.loads(runner.invoke(app, args + ["--backend", "ort-fast"]).output.strip().splitlines()[-1])
    assert fast["token_ids"] == portable["token_ids"]


def test_bad_flag_is_a_user_error_but_an_internal_valueerror_is_not(tiny_models, tmp_path, monkeypatch):
    """Only UsageError (bad input) becomes a one-line error; a ValueError from a bug keeps its traceback."""
    pkg = str(tiny_models["llava-hf-v1.5"]["package"])
    args = ["run", pkg, "--image", str(_image(tmp_path)), "--prompt", "hi", "--max-new-tokens", "2"]
    _assert_user_error(runner.invoke(app, [*args, "--top-p", "1.5"]), "top_p")

    import llava_edge.runtime.engine as engine  # `run` goes through the engine: it preprocesses the image

    def broken(*a, **k):
        raise ValueError("operands could not be broadcast together")  # what a numpy bug looks like

    monkeypatch.setattr(engine, "preprocess", broken)
    result = runner.invoke(app, [*args, "--greedy"])
    assert result.exit_code not in (0, 2)
    assert isinstance(result.exception, ValueError) and "broadcast" in str(result.exception)


# -- options: defined once, one name and type per flag, help everywhere (issue 23) ---------------------------
def _commands():
    import typer.main

    return typer.main.get_command(app).commands


def _options(cmd):
    return [p for p in cmd.params if getattr(p, "opts", None) and p.param_type_name == "option"]


def _type(p) -> str:
    """An option's value type as the user meets it: Optional[int] is int; a size parser is "size"."""
    import typing

    info = p.type_descriptor
    parser = getattr(info.parameter_info, "parser", None)
    if parser is not None:
        return parser.__name__
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    annotation = args[0] if typing.get_origin(info.annotation) is typing.Union and len(args) == 1 else info.annotation
    return f"{annotation}{' flag' if p.is_flag else ''}"


def test_every_option_and_argument_of_every_command_has_help():
    missing = [f"{name} {p.name}" for name, cmd in _commands().items() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert not missing, f"without help text: {missing}"
    assert all((cmd.help or "").strip() for cmd in _commands().values())


def test_a_flag_has_one_type_and_a_short_flag_one_long_name_in_every_verb():
    types: dict[str, dict[tuple, list[str]]] = {}
    shorts: dict[str, dict[str, list[str]]] = {}
    for name, cmd in _commands().items():
        for p in _options(cmd):
            kind = _type(p)
            longs = [o for o in p.opts if o.startswith("--")]
            for flag in [*p.opts, *p.secondary_opts]:
                types.setdefault(flag, {}).setdefault(kind, []).append(name)
            for flag in (o for o in p.opts if not o.startswith("--")):
                shorts.setdefault(flag, {}).setdefault(longs[0], []).append(name)
    assert not {f: k for f, k in types.items() if len(k) > 1}, "a flag with different types in different verbs"
    assert not {f: k for f, k in shorts.items() if len(k) > 1}, "a short flag standing for different options"
    assert set(shorts) == {"-o", "-p", "-i", "-s"}  # --output, --prompt, --image, watch's --source


def test_tokens_to_generate_is_max_new_tokens_and_old_names_come_second():
    for name in ("run", "chat", "watch", "eval", "bench", "bench-serve", "demo"):
        (p,) = [p for p in _commands()[name].params if "--max-new-tokens" in p.opts]
        assert p.opts[0] == "--max-new-tokens" and p.name == "max_new_tokens", (name, p.opts)
    old = {name: [o for p in _options(cmd) for o in [o for o in p.opts if o.startswith("--")][1:]]
           for name, cmd in _commands().items()}
    assert {k: v for k, v in old.items() if v} == {"bench": ["--new-tokens"], "bench-serve": ["--max-tokens"]}
    # serve's --max-tokens is the server's cap on the API's max_tokens, its own setting (serve/settings.py)
    (cap,) = [p for p in _commands()["serve"].params if "--max-tokens" in p.opts]
    assert cap.opts == ["--max-tokens"] and "--max-new-tokens" in cap.help


def _parse(verb, *args):
    return _commands()[verb].make_context(verb, list(args)).params


@pytest.mark.parametrize("value, pixels", [("40M", 40_000_000), ("2000000", 2_000_000), ("1Mi", 2**20),
                                           (" 3k ", 3000)])
def test_max_image_pixels_reads_the_same_sizes_in_every_verb(value, pixels):
    for verb, args in (("run", ["pkg", "-p", "x"]), ("chat", ["pkg"]), ("serve", [])):
        assert _parse(verb, *args, "--max-image-pixels", value)["max_image_pixels"] == pixels, verb
    r = runner.invoke(app, ["run", "pkg", "-p", "x", "--max-image-pixels", "lots"])
    _assert_user_error(r, "Invalid value for '--max-image-pixels'", "cannot read 'lots' as a size")


def test_serve_flags_ray_args_and_defaults_come_from_the_serve_config_fields():
    import dataclasses

    from llava_edge.serve.settings import ServeConfig, serve_settings

    settings = serve_settings()
    names = {f.name for f in dataclasses.fields(ServeConfig) if f.init} - {"package", "model_name"}
    assert {s.name for s in settings} == names  # every setting is an option
    flags = {o for p in _options(_commands()["serve"]) for o in [*p.opts, *p.secondary_opts]}
    assert {s.flag for s in settings} <= flags
    assert "--no-ui" in flags and {"--allowed-host", "--allow-origin", "--suggest"} <= flags
    parsed = _parse("serve")  # the CLI's defaults are the dataclass's, sizes included (once 256KB vs 256KiB)
    for s in settings:
        value = parsed[s.name]
        assert (tuple(value) if isinstance(value, list) else value) == s.default, s.name
    cfg = ServeConfig("pkg", **{s.name: parsed[s.name] for s in settings})
    cfg.validate()


def test_ray_builder_args_are_the_serve_config_fields_ray_forwards():
    pytest.importorskip("ray", reason="needs the ray extra")
    from llava_edge.serve import ray_app
    from llava_edge.serve.settings import serve_settings

    assert set(ray_app._SERVE_ARGS) == {s.name for s in serve_settings() if s.ray}
    assert ray_app._SERVE_ARGS["max_image_pixels"] == "size" and ray_app._SERVE_ARGS["allowed_hosts"] == "list"
    assert not {"host", "port", "header_timeout", "max_connections", "shutdown_timeout"} & set(ray_app._SERVE_ARGS)


def test_ray_options_are_flags_and_builder_args_from_one_dataclass():
    """RayOptions' fields are serve's --replicas ... flags (passed only when given) and ray_app's _RAY_ARGS."""
    import dataclasses

    from llava_edge.errors import UsageError
    from llava_edge.serve.settings import RayOptions, ray_settings

    names = {f.name for f in dataclasses.fields(RayOptions)}
    assert {s.name for s in ray_settings()} == names
    flags = {o for p in _options(_commands()["serve"]) for o in p.opts}
    assert {"--" + n.replace("_", "-") for n in names} <= flags
    parsed = _parse("serve")
    assert all(parsed[n] is None for n in names)  # not given: RayOptions' own defaults apply
    assert RayOptions(autoscale="1,3").autoscale == (1, 3)
    with pytest.raises(UsageError, match="--cpus-per-replica must be >= 0"):
        RayOptions(cpus_per_replica=-1)
    if importlib.util.find_spec("ray") is not None:
        from llava_edge.serve import ray_app

        assert set(ray_app._RAY_ARGS) == names and ray_app._RAY_ARGS["autoscale"] is ray_app.parse_autoscale


def test_serve_validation_names_the_flag_from_the_field():
    from llava_edge.errors import UsageError
    from llava_edge.serve.settings import ServeConfig

    for kw, message in (({"max_slots": 0}, "--max-slots must be between 1 and 1024"),
                        ({"max_image_pixels": 0}, "--max-image-pixels must be >= 1"),
                        ({"header_timeout": float("nan")}, "--header-timeout must be a finite number")):
        with pytest.raises(UsageError, match=message):
            ServeConfig("pkg", **kw).validate()


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--new-tokens"])
def test_an_old_flag_name_still_works_and_its_error_names_it(flag):
    assert _parse("bench", "pkg", flag, "7")["max_new_tokens"] == 7
    _assert_user_error(runner.invoke(app, ["bench", "nope", flag, "0"]), f"{flag} must be >= 1")
    assert _parse("bench-serve", "--url", "u", "--max-tokens", "5")["max_new_tokens"] == 5

"""QuantizeOptions is the one definition of quantize's knobs: the CLI's flags, their defaults and help
come from its fields, quantize_package takes it, and one validation refuses what the CLI's and
quantize_package's separate checks used to refuse (issue 23, "options defined once")."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import typer
import typer.main
from typer.testing import CliRunner

from llava_edge import packing
from llava_edge.cli import _with_settings, app
from llava_edge.errors import UsageError
from llava_edge.options import option, settings_of
from llava_edge.quantize import quantize as quantize_mod
from llava_edge.quantize.onnx_writer import FORMATS
from llava_edge.quantize.options import BITS, Method, QuantFormat, QuantizeOptions, quantize_settings

runner = CliRunner()
# quantize_package's own arguments (where to read and write), not QuantizeOptions fields
PATH_FLAGS = {"checkpoint": ["--checkpoint"], "output": ["-o", "--output"], "overwrite": ["--overwrite"]}
# every flag `quantize` had before its flags came from QuantizeOptions: each still parses
OLD_FLAGS = ["--checkpoint", "--calib", "--calib-images", "--samples", "--bits", "--group-size", "--act-order",
             "--no-act-order", "--method", "--format", "--from-gptq", "-o", "--output", "--quantize-lm-head",
             "--no-quantize-lm-head", "--seed", "--threads", "--overwrite"]


def _quantize_cmd():
    return typer.main.get_command(app).commands["quantize"]


def _options(cmd) -> dict:
    return {p.name: p for p in cmd.params if p.param_type_name == "option"}


def _parse(*args: str) -> dict:
    return _quantize_cmd().make_context("quantize", ["pkg", *args]).params


def test_the_flags_are_the_fields_one_to_one():
    """A field added without option() has no flag, and a flag written in cli.py is no field: both fail."""
    opts = _options(_quantize_cmd())
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    assert set(opts) - set(PATH_FLAGS) == fields
    assert [s.name for s in quantize_settings()] == [f.name for f in dataclasses.fields(QuantizeOptions)]
    for name, flags in PATH_FLAGS.items():
        assert opts[name].opts == flags
    for s in quantize_settings():
        assert opts[s.name].opts == [s.flag] and opts[s.name].help == s.help and s.help.strip(), s.name
    flags = {o for p in opts.values() for o in [*p.opts, *p.secondary_opts]}
    assert set(OLD_FLAGS) <= flags
    assert {"--holdout", "--damp", "--blocksize", "--max-seq-len", "--device", "--torch-threads"} <= flags


def test_the_parsed_defaults_are_the_dataclass_defaults():
    parsed = _parse()
    for f in dataclasses.fields(QuantizeOptions):
        assert parsed[f.name] == f.default, f.name
    assert QuantizeOptions(**{f.name: parsed[f.name] for f in dataclasses.fields(QuantizeOptions)}) == QuantizeOptions()
    assert (parsed["method"], parsed["format"]) == (Method.GPTQ, QuantFormat.MATMULNBITS)


def test_a_default_changed_in_the_dataclass_is_the_flags_default_and_shows_in_help():
    """The mechanism that writes quantize's flags, on a QuantizeOptions whose group size default is 64."""

    @dataclasses.dataclass(frozen=True)
    class Changed(QuantizeOptions):
        group_size: int = option(64, "Group, changed.")

    seen = {}
    toy = typer.Typer()

    @toy.command()
    @_with_settings(settings_of(Changed), after="package", into="options")
    def go(package: str = typer.Argument(..., help="p"), options: dict = None) -> None:
        seen.update(options)

    @toy.command()
    def other() -> None:
        """A second command, so typer keeps `go` a subcommand."""

    r = runner.invoke(toy, ["go", "pkg"])
    assert r.exit_code == 0, r.output
    assert seen["group_size"] == 64 and seen["bits"] == 4 and seen["method"] is Method.GPTQ
    help_text = " ".join(runner.invoke(toy, ["go", "--help"]).output.split())
    assert "Group, changed." in help_text and "64" in help_text


@pytest.mark.parametrize("field, value, needle", [
    ("bits", 3, "--bits must be 4 or 8, not 3"),  # both refused it
    ("bits", 16, "--bits must be 4 or 8, not 16"),
    ("group_size", 0, "--group-size must be a power of two"),
    ("group_size", 8, "--group-size must be a power of two"),  # quantize_package's floor (16)
    ("group_size", 48, "--group-size must be a power of two"),
    ("group_size", 8192, "--group-size must be a power of two from 16 to 4096"),  # the CLI's ceiling
    ("samples", 0, "--samples must be >= 1"),
    ("samples", 2**31, "--samples must be at most 2147483647"),
    ("holdout", -1, "--holdout must be >= 0"),  # quantize_package's alone
    ("seed", -1, "--seed must be >= 0"),
    ("seed", 2**32, "--seed must be at most 4294967295"),
    ("threads", 0, "--threads must be >= 1"),
    ("threads", 5000, "--threads must be at most 4096"),
    ("torch_threads", 0, "--torch-threads must be >= 1"),
    ("damp", 0.0, "--damp must be a positive number"),
    ("damp", math.nan, "--damp must be a positive number"),
    ("blocksize", 0, "--blocksize must be >= 1"),
    ("max_seq_len", 0, "--max-seq-len must be >= 1"),
    ("device", "gpu", "--device 'gpu': use cpu, cuda or cuda:N"),
    ("method", "awq", "--method 'awq': use one of gptq, rtn"),
    ("format", "gguf", "--format 'gguf': use one of matmulnbits, qdq"),
])
def test_one_validation_refuses_what_the_cli_and_quantize_package_refused(field, value, needle, tmp_path,
                                                                          monkeypatch):
    with pytest.raises(UsageError) as e:
        QuantizeOptions(**{field: value})
    assert needle in str(e.value)
    monkeypatch.chdir(tmp_path)  # "nope" is relative: nothing exists, nothing is written
    r = runner.invoke(app, ["quantize", "nope", "--" + field.replace("_", "-"), str(value)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    # typer refuses an enum's unknown value itself, naming the flag and the choices
    expected = f"Invalid value for '--{field}'" if field in ("method", "format") else needle
    assert expected in " ".join(r.output.split()), r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw", [dict(group_size=16), dict(group_size=4096), dict(bits=8), dict(device="cuda:1"),
                                dict(seed=2**32 - 1), dict(threads=4096), dict(holdout=0)])
def test_the_edges_of_each_range_are_accepted(kw):
    assert dataclasses.asdict(QuantizeOptions(**kw)).items() >= kw.items()


def test_a_python_callers_strings_become_the_enums_and_stay_plain_strings_in_json():
    o = QuantizeOptions(method="rtn", format="qdq", from_gptq="ck")
    assert (o.method, o.format, o.label) == (Method.RTN, QuantFormat.QDQ, "gptq-import")
    assert json.dumps([o.method, o.format]) == '["rtn", "qdq"]'
    assert FORMATS == tuple(f.value for f in QuantFormat) and BITS == packing.SUPPORTED_BITS
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.bits = 3  # a QuantizeOptions that exists has passed its checks


def test_the_flags_reach_quantize_package_as_the_options(fp_package, tmp_path, monkeypatch):
    pkg, ckpt = fp_package
    seen = {}

    def fake(package_dir, checkpoint_dir, out_dir, options, **kw):
        seen.update(options=options, out_dir=out_dir, **kw)
        return quantize_mod.QuantizeResult(tmp_path / "q", None, None)

    monkeypatch.setattr(quantize_mod, "quantize_package", fake)
    args = ["--group-size", "64", "--method", "rtn", "--format", "qdq", "--no-act-order", "--threads", "2",
            "--torch-threads", "3", "--holdout", "0", "--damp", "0.1", "--seed", "7", "--device", "cpu"]
    r = runner.invoke(app, ["quantize", str(pkg), "--checkpoint", str(ckpt), "-o", str(tmp_path / "q"), *args])
    assert r.exit_code == 0, r.output
    assert seen["options"] == QuantizeOptions(group_size=64, method="rtn", format="qdq", act_order=False, threads=2,
                                              torch_threads=3, holdout=0, damp=0.1, seed=7, device="cpu")
    assert seen["out_dir"] == tmp_path / "q" and seen["overwrite"] is False


def test_threads_are_onnxruntimes_and_torch_threads_torchs(fp_package, tmp_path, monkeypatch):
    """--threads reaches the report's onnxruntime sessions, --torch-threads holds while GPTQ runs and is
    undone after (the two meanings --threads used to have, one flag each)."""
    pkg, ckpt = fp_package
    before = torch.get_num_threads()
    seen = {}
    compare, layers = quantize_mod.compare_packages, quantize_mod.quantize_layers

    def spy_compare(fp, q, samples, threads):
        seen["ort"] = threads
        return compare(fp, q, samples, threads)

    def spy_layers(*a, **k):
        seen["torch"] = torch.get_num_threads()
        return layers(*a, **k)

    monkeypatch.setattr(quantize_mod, "compare_packages", spy_compare)
    monkeypatch.setattr(quantize_mod, "quantize_layers", spy_layers)
    options = QuantizeOptions(samples=2, holdout=1, group_size=32, method="rtn", threads=1, torch_threads=before + 1)
    quantize_mod.quantize_package(pkg, ckpt, tmp_path / "q", options, progress=False, print_report=False)
    assert seen == {"ort": 1, "torch": before + 1}
    assert torch.get_num_threads() == before

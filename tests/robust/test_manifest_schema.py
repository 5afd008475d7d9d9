"""A hostile or nonsense package is refused at load with one line naming the field (issue 24): the
manifest's schema (types, ranges, dtypes), the files it names (relative, inside the package after
symlinks, regular files) and its tokenizer.json (parses, ids fit the model, no catastrophic regex).
Each case corrupts a private copy of the tiny package and expects a PackageError from `load_manifest`
(or `load_tokenizer`) and exactly one `error:` line, exit 2, from `llava-edge inspect PKG --verify`,
raised before any file outside the package is read."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import llava_edge.package as package
from llava_edge.cli import app
from llava_edge.package import Manifest, PackageError, load_manifest, verify_package
from llava_edge import tokenizer_check
from llava_edge.tokenizer_check import load_tokenizer

from .test_errors import one_error_line


@pytest.fixture
def copy(pkg, tmp_path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def edit(d: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def reseal(d: Path) -> None:
    """Record the digests of the files as they now are: a hostile author ships a consistent manifest."""
    edit(d, lambda m: m["digests"].update({rel: hashlib.sha256((d / rel).read_bytes()).hexdigest()
                                           for rel in m["digests"]}))


def edit_tokenizer(d: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    t = json.loads((d / "tokenizer.json").read_text())
    change(t)
    (d / "tokenizer.json").write_text(json.dumps(t))
    reseal(d)


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO that cannot hang the test: a writer opens and closes it as soon as anything reads it (the
    reader sees EOF); afterwards we open its read end without blocking, which lets the writer go."""
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(5)
        os.close(fd)


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *keys, value = keys_and_value

    def change(m: dict[str, Any]) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return change


def _graph_is_a_fifo(d: Path, stack: contextlib.ExitStack) -> None:
    stack.enter_context(fifo(d / "vision.fifo"))
    edit(d, _set("graphs", "vision", "file", "vision.fifo"))


def _digested_fifo(d: Path, stack: contextlib.ExitStack) -> None:
    stack.enter_context(fifo(d / "notes.fifo"))
    edit(d, _set("digests", "notes.fifo", "0" * 64))


def _graph_is_a_directory(d: Path, stack: contextlib.ExitStack) -> None:
    (d / "sub").mkdir()
    edit(d, _set("graphs", "vision", "file", "sub"))


def _symlink_out(name: str) -> Callable[[Path, contextlib.ExitStack], None]:
    """`name` replaced by a symlink to a byte-identical copy outside: its digest would still match."""

    def make(d: Path, stack: contextlib.ExitStack) -> None:
        outside = d.parent / f"outside-{name}"
        shutil.copy(d / name, outside)
        (d / name).unlink()
        (d / name).symlink_to(outside)

    return make


def _manifest_symlink_out(d: Path, stack: contextlib.ExitStack) -> None:
    shutil.copy(d / "manifest.json", d.parent / "outside-manifest.json")
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(d.parent / "outside-manifest.json")


def _nested(d: Path, stack: contextlib.ExitStack) -> None:
    (d / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _manifest(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path, contextlib.ExitStack], None]:
    return lambda d, stack: edit(d, change)


def _pop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(m: dict[str, Any]) -> None:
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]

    return change


# (id, how to break the copy, text the one line must hold)
CASES = [
    # -- files the manifest names --------------------------------------------------------------------
    ("graph-file-dotdot", _manifest(_set("graphs", "vision", "file", "../../x")),
     'graphs.vision.file must be a relative path inside the package (no \'..\', not absolute), not "../../x"'),
    ("graph-file-absolute", _manifest(_set("graphs", "vision", "file", "/etc/passwd")),
     'graphs.vision.file must be a relative path inside the package'),
    ("graph-file-newline", _manifest(_set("graphs", "vision", "file", "a\nb")),
     "graphs.vision.file must be a relative"),
    ("external-data-dotdot", _manifest(_set("graphs", "decoder", "external_data", ["x/../../y.data"])),
     "graphs.decoder.external_data[0] must be a relative path inside the package"),
    ("digest-key-dotdot", _manifest(_set("digests", "../../x", "0" * 64)),
     'digests must name files by relative paths inside the package (no \'..\', not absolute), not "../../x"'),
    ("digest-key-absolute", _manifest(_set("digests", "/etc/passwd", "0" * 64)), 'not "/etc/passwd"'),
    ("digest-not-a-string", _manifest(_set("digests", "vision.onnx", 5)),
     'digests must map "vision.onnx" to a sha256 hex string, not 5'),
    ("digest-of-missing-file", _manifest(_set("digests", "gone.bin", "0" * 64)),
     "records a digest for missing file gone.bin"),
    ("graph-symlink-out", _symlink_out("vision.onnx"),
     "graph 'vision' file vision.onnx leads outside the package (through a symlink)"),
    ("tokenizer-symlink-out", _symlink_out("tokenizer.json"), "tokenizer tokenizer.json leads outside the package"),
    ("manifest-symlink-out", _manifest_symlink_out, "manifest manifest.json leads outside the package"),
    ("graph-is-a-fifo", _graph_is_a_fifo, "graph 'vision' file vision.fifo is a FIFO, not a regular file"),
    ("digested-fifo", _digested_fifo, "digested file notes.fifo is a FIFO, not a regular file"),
    ("graph-is-a-directory", _graph_is_a_directory, "graph 'vision' file sub is a directory, not a regular file"),
    # -- values --------------------------------------------------------------------------------------
    ("num-kv-heads-zero", _manifest(_set("text", "num_kv_heads", 0)),
     "manifest field text.num_kv_heads must be a positive integer, not 0"),
    ("num-kv-heads-not-dividing", _manifest(_set("text", "num_kv_heads", 3)),
     "text.num_kv_heads must divide text.num_heads (4), not 3"),
    ("num-kv-heads-over-heads", _manifest(_set("text", "num_kv_heads", 8)),
     "text.num_kv_heads must be at most text.num_heads (4), not 8"),
    ("head-dim-negative", _manifest(_set("text", "head_dim", -1)), "text.head_dim must be a positive integer, not -1"),
    ("dtype-int7", _manifest(_set("dtype", "int7")),
     'manifest field dtype must be one of float32, float16, not "int7"'),
    ("tensor-dtype-int7", _manifest(lambda m: m["graphs"]["decoder"]["inputs"][0].update(dtype="int7")),
     'graphs.decoder.inputs[0].dtype must be one of'),
    ("num-image-tokens-1e9-float", _manifest(_set("vision", "num_image_tokens", 1e9)),
     "vision.num_image_tokens must be a positive integer, not 1000000000.0"),
    ("num-image-tokens-huge", _manifest(_set("vision", "num_image_tokens", 10**9)),
     "vision.num_image_tokens must be at most 65536, not 1000000000"),
    ("max-context-huge", _manifest(_set("text", "max_context", 2**40)), "text.max_context must be at most 2097152"),
    ("num-layers-bool", _manifest(_set("text", "num_layers", True)),
     "text.num_layers must be a positive integer, not true"),
    ("hidden-size-string", _manifest(_set("text", "hidden_size", "64")),
     'text.hidden_size must be a positive integer, not "64"'),
    ("vocab-size-zero", _manifest(_set("text", "vocab_size", 0)), "text.vocab_size must be a positive integer, not 0"),
    ("patch-size-over-image", _manifest(_set("vision", "patch_size", 64)),
     "vision.patch_size must be at most vision.image_size (32), not 64"),
    ("image-size-huge", _manifest(_set("vision", "image_size", 100_000)), "vision.image_size must be at most 4096"),
    ("resample-unknown", _manifest(_set("vision", "resample", 9)), "vision.resample must be at most 5, not 9"),
    ("eos-not-a-list", _manifest(_set("text", "eos_token_ids", 2)),
     "text.eos_token_ids must be a list of 1 to 64 items, not 2"),
    ("eos-empty", _manifest(_set("text", "eos_token_ids", [])),
     "text.eos_token_ids must be a list of 1 to 64 items, not 0"),
    ("eos-past-vocab", _manifest(_set("text", "eos_token_ids", [2, 385])),
     "text.eos_token_ids[1] must be below text.vocab_size (385), not 385"),
    ("pad-negative", _manifest(_set("text", "pad_token_id", -1)),
     "text.pad_token_id must be a non-negative integer, not -1"),
    ("image-mean-not-a-list", _manifest(_set("vision", "image_mean", 0.5)),
     "vision.image_mean must be a list of 3 items"),
    ("image-std-zero", _manifest(_set("vision", "image_std", [0, 1, 1])),
     "vision.image_std[0] must be a positive number, not 0"),
    ("rescale-nan", _manifest(_set("vision", "rescale_factor", float("nan"))),
     "vision.rescale_factor must be a positive number, not NaN"),
    ("feature-layer-float", _manifest(_set("vision", "vision_feature_layer", -2.0)),
     "vision.vision_feature_layer must be an integer from -4096 to 4096, not -2.0"),
    ("strategy-unknown", _manifest(_set("vision", "select_strategy", "all")),
     "vision.select_strategy must be one of default, full"),
    ("anyres-pinpoint-huge",
     _manifest(_set("vision", "anyres", {"grid_pinpoints": [[99999, 32]], "image_newline": [0.0] * 64})),
     "vision.anyres.grid_pinpoints[0][0] must be at most 4096, not 99999"),
    ("anyres-newline-wrong-length",
     _manifest(_set("vision", "anyres", {"grid_pinpoints": [[32, 64]], "image_newline": [0.0]})),
     "vision.anyres.image_newline must be a list of 64 items, not 1"),
    ("graphs-not-an-object", _manifest(_set("graphs", ["vision.onnx"])),
     'manifest field graphs must be a JSON object, not ["vision.onnx"]'),
    ("graph-inputs-not-a-list", _manifest(_set("graphs", "vision", "inputs", "pixel_values")),
     'graphs.vision.inputs must be a list of 0 to 4096 items, not "pixel_values"'),
    ("graph-size-negative", _manifest(_set("graphs", "vision", "size_bytes", -1)),
     "graphs.vision.size_bytes must be a non-negative integer, not -1"),
    ("graph-name-with-newline", _manifest(lambda m: m["graphs"].update({"x\nerror: y": m["graphs"]["vision"]})),
     'manifest field graphs must name graphs with letters, digits'),
    ("text-key-missing", _manifest(_pop("text", "head_dim")), "manifest field text.head_dim is missing"),
    ("text-key-unknown", _manifest(_set("text", "rope", 1)),
     "manifest field text.rope is not one this llava-edge knows"),
    ("format-version-bool", _manifest(_set("format_version", True)), "no integer format_version"),
    ("manifest-nested-100000-deep", _nested, "manifest.json is not valid JSON"),
]


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Every file the package code hashes, as it hashes it."""
    seen: list[Path] = []
    real = package.file_sha256

    def spy(path, *a, **k):
        seen.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(package, "file_sha256", spy)
    return seen


@pytest.mark.parametrize("make, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_manifest_is_one_line(copy, make, needle, runner, hashed):
    with contextlib.ExitStack() as stack:
        make(copy, stack)
        with pytest.raises(PackageError) as e:
            load_manifest(copy)
        message = str(e.value)
        assert needle in message and str(copy) in message and "\n" not in message, message
        result = runner.invoke(app, ["inspect", str(copy), "--verify"])
        assert result.exit_code == 2, result.output
        one_error_line(result)
        assert needle in " ".join(result.output.split()), result.output
    # the refusal comes before anything outside the package is read: nothing outside was hashed
    assert all(p.resolve().is_relative_to(copy.resolve()) for p in hashed), hashed


def _tokenizer(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda d: edit_tokenizer(d, change)


def _not_json(d: Path) -> None:
    (d / "tokenizer.json").write_text("{ not json")
    reseal(d)


EVIL_REGEX = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
_catastrophic = _tokenizer(lambda t: t.update(pre_tokenizer={"type": "Sequence",
                                                             "pretokenizers": [EVIL_REGEX, t["pre_tokenizer"]]}))

# (id, how to break the copy (its manifest stays sound and sealed), text the one line must hold)
TOKENIZER_CASES = [
    ("tokenizer-not-json", _not_json, "cannot load tokenizer.json of"),
    ("tokenizer-without-eos", _tokenizer(lambda t: (t["added_tokens"].pop(2), t["model"]["vocab"].pop("</s>"))),
     "tokenizer.json has no token 2, which manifest field text.eos_token_ids names"),
    ("tokenizer-id-past-vocab", _tokenizer(lambda t: t["added_tokens"].append(
        {"id": 100_000, "content": "<evil>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True})),  # tokenizers renumbers it to the next free id
     "tokenizer.json has token id 385, past the model's 385 embedding rows"),
    ("tokenizer-other-image-token", lambda d: edit(d, _set("text", "image_token", "</s>")),
     "tokenizer.json maps the image token '</s>' to 2, but manifest field text.image_token_id is 384"),
    ("tokenizer-catastrophic-regex", _catastrophic, "tokenizer.json"),
]


@pytest.mark.parametrize("make, needle", [c[1:] for c in TOKENIZER_CASES], ids=[c[0] for c in TOKENIZER_CASES])
def test_hostile_tokenizer_is_one_line(copy, make, needle, runner):
    make(copy)
    manifest = load_manifest(copy)  # the manifest itself is sound
    with pytest.raises(PackageError) as e:
        load_tokenizer(copy, manifest)
    message = str(e.value)
    assert needle in message and str(copy) in message and "\n" not in message, message
    if make is _catastrophic:  # whichever comes first: oniguruma's retry limit, or our clock
        assert "fails on a probe text" in message or "takes over" in message, message
    for argv in (["inspect", str(copy), "--verify"], ["run", str(copy), "-p", "hi", "--max-new-tokens", "1"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, result.output
        one_error_line(result)
        assert needle in " ".join(result.output.split()), result.output


def test_a_slow_tokenizer_is_refused_by_the_clock(copy, monkeypatch):
    """Oniguruma gives up on `(a+)+$` only after ~1 s of backtracking; a limit below that refuses it
    as too slow (the probe thread finishes on its own afterwards)."""
    _catastrophic(copy)
    monkeypatch.setattr(tokenizer_check, "PROBE_TIMEOUT_S", 0.05)
    with pytest.raises(PackageError, match="takes over 0.05 s to encode"):
        load_tokenizer(copy, load_manifest(copy))


def test_an_oversized_tokenizer_is_refused_before_it_is_parsed(copy, monkeypatch):
    monkeypatch.setattr(tokenizer_check, "MAX_TOKENIZER_BYTES", 1024)
    with pytest.raises(PackageError, match=r"tokenizer.json is [\d,]+ bytes, over the limit of 1,024"):
        load_tokenizer(copy, load_manifest(copy))


def test_a_valid_package_still_loads_and_verifies(copy, runner, tiny_models):
    m = load_manifest(copy)
    assert Manifest.from_dict(dataclasses.asdict(m)) == m  # quantize rebuilds a manifest this way
    assert load_tokenizer(copy, m).token_to_id("<image>") == m.text.image_token_id
    r = runner.invoke(app, ["inspect", str(copy), "--verify"])
    assert r.exit_code == 0 and "verified 4 files" in r.output, r.output
    # a symlink that stays inside the package is fine (a blob store laid out in the package)
    (copy / "blobs").mkdir()
    (copy / "vision.onnx").rename(copy / "blobs" / "vision.onnx")
    (copy / "vision.onnx").symlink_to(Path("blobs") / "vision.onnx")
    assert verify_package(copy)[1] == []
    # the original layout's <image> id lies past the vocabulary, in its own embedding row
    original = tiny_models["original-v1"]["package"]
    m = load_manifest(original)
    assert m.text.image_token_id >= m.text.vocab_size
    load_tokenizer(original, m)


def test_manifest_without_package_names_the_field():
    """Manifest.from_dict without a package (quantize's round trip) names the field alone."""
    text = {"hidden_size": 8, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 8, "vocab_size": 10,
            "max_context": 16, "bos_token_id": None, "eos_token_ids": [1], "pad_token_id": 0,
            "image_token": "<image>", "image_token_id": 9, "chat_template": "llava_hf"}
    with pytest.raises(PackageError, match=r'^manifest field dtype must be one of float32, float16, not "int7"$'):
        Manifest.from_dict({"format_version": 1, "source": {}, "dtype": "int7", "text": text, "vision": {},
                            "graphs": {}})

"""JSON-schema constrained decoding (runtime/constrain.py) on a tiny LLaVA with a byte-level BPE tokenizer.

The model's weights are random, so left alone it writes bytes that are not JSON: whatever parses here
parsed because of the constraint. A word-level tokenizer (the shipped demo model had one before it was
retrained) has no '{' or '"' token and cannot write JSON at all; it must be refused with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="llguidance (the `structured` extra) is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")

from llava_edge.runtime.sequence import GenerationParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue", "yellow"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "box": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 100},
                                                "seen": {"type": "boolean"}},
                "required": ["x", "seen"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["color", "count", "box"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def bpe_package(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from llava_edge.export.exporter import export_package
    from llava_edge.export.factory import build_checkpoint
    from llava_edge.export.fast_decoder import export_fast_decoder

    root = tmp_path_factory.mktemp("constrain")
    build_checkpoint(root / "ckpt", "llava-hf-v1.5")
    export_package(root / "ckpt", root / "pkg")
    export_fast_decoder(root / "ckpt", root / "pkg")
    return root / "pkg"


@pytest.fixture(scope="module")
def pipe(bpe_package):
    from llava_edge.runtime.pipeline import Pipeline

    return Pipeline.from_package(bpe_package, backend="ort-fast", threads=1)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_unconstrained_answer_is_not_json(pipe, image):
    """The premise of the next tests: without the constraint this model does not write JSON."""
    text = pipe.generate(image, "describe the image", 40).text
    with pytest.raises(ValueError):
        json.loads(text)


def test_sampled_answers_parse_and_validate(pipe, image):
    """50 generations at temperature 1.0 with different seeds, all in one engine (batched decode): every
    answer is JSON that validates; the seeds really give different answers."""
    from llava_edge.runtime.constrain import Grammar
    from llava_edge.runtime.pipeline import Request
    from llava_edge.runtime.sampling import SamplingConfig

    engine = pipe.make_engine(max_slots=4)
    grammar = Grammar(pipe.tokenizer, frozenset(pipe.manifest.text.eos_token_ids), SCHEMA)
    ids = pipe.encode_request(Request([("what is in the image?", None)], [image]))
    seqs = []
    for seed in range(50):
        params = GenerationParams(160, SamplingConfig(temperature=1.0, seed=seed), grammar=grammar)
        seqs.append(engine.make_sequence(ids, [image], params, index=seed))
    list(engine.run_until_done(seqs))
    answers = []
    for s in seqs:
        r = s.result()
        assert r.finish_reason == "eos", (r.finish_reason, r.text)
        obj = json.loads(r.text)
        jsonschema.validate(obj, SCHEMA)
        answers.append(r.text)
    assert len(set(answers)) > 10


def test_json_object_mode(pipe, image):
    """No schema (response_format json_object): any JSON object."""
    from llava_edge.runtime.constrain import Grammar
    from llava_edge.runtime.pipeline import Request
    from llava_edge.runtime.sampling import SamplingConfig

    engine = pipe.make_engine(max_slots=4)
    grammar = Grammar(pipe.tokenizer, frozenset(pipe.manifest.text.eos_token_ids), None)
    ids = pipe.encode_request(Request([("describe", None)], [image]))
    seqs = []
    for seed in range(8):
        seqs.append(engine.make_sequence(ids, [image], GenerationParams(150, SamplingConfig(temperature=0.7, seed=seed),
                                                                        grammar=grammar)))
    list(engine.run_until_done(seqs))
    done = [s for s in seqs if s.finish_reason == "eos"]
    assert len(done) >= 4  # an object may still be open at max_tokens; those that ended must parse
    for s in done:
        assert isinstance(json.loads(s.result().text), dict)


def test_greedy_kept_under_a_narrower_schema(pipe, image):
    """Greedy under a schema is argmax over allowed tokens: a narrower schema that still admits the
    answer (here: that exact object as a const) gives the same tokens."""
    wide = pipe.generate(image, "where is the shape?", 120, json_schema=SCHEMA)
    obj = json.loads(wide.text)
    jsonschema.validate(obj, SCHEMA)
    narrow = pipe.generate(image, "where is the shape?", 120,
                           json_schema={**SCHEMA, "properties": {**SCHEMA["properties"],
                                                                 "color": {"enum": [obj["color"]]}}})
    assert narrow.token_ids == wide.token_ids


def test_unsupported_schema_and_tokenizer_are_one_line_errors(pipe, bpe_package, tmp_path):
    from llava_edge.runtime.constrain import ConstraintError, Grammar

    with pytest.raises(ConstraintError, match="unsupported JSON schema"):
        Grammar(pipe.tokenizer, frozenset([2]), {"not": {"type": "string"}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "nonsense"}}}')
    r = subprocess.run([sys.executable, "-m", "llava_edge.cli", "run", str(bpe_package), "-p", "describe",
                        "--json-schema", str(bad), "--backend", "ort-fast"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "nonsense" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a word-level tokenizer (what the shipped demo model had before it was retrained): no way to write '{'
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "red": 2, "circle": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConstraintError, match="byte-level") as refused:
        Grammar(words, frozenset([1]), SCHEMA)
    assert "decoder type" not in str(refused.value) and "WordLevel" in str(refused.value)  # the fix, not internals


def test_run_cli_json_schema(bpe_package, tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(img)
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "llava_edge.cli", "run", str(bpe_package), "-p", "describe", "-i",
                        str(img), "--json-schema", str(schema), "--json", "--max-new-tokens", "120",
                        "--temperature", "1.0", "--seed", "7", "--backend", "ort-fast"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(json.loads(r.stdout)["text"]), SCHEMA)


def test_watch_json_schema(bpe_package, tmp_path):
    """`watch --json-schema`: every line's answer parses, validates and is also in the line as "json"."""
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(frames / f"{i}.png")
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "llava_edge.cli", "watch", str(bpe_package), "--source", str(frames),
                        "--prompt", "describe", "--json-schema", str(schema), "--max-new-tokens", "160",
                        "--backend", "ort-fast"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 3 and not any(x["reused"] for x in lines)
    for x in lines:
        assert x["finish_reason"] == "eos"
        assert json.loads(x["answer"]) == x["json"]
        jsonschema.validate(x["json"], SCHEMA)


def test_constrained_and_free_sequences_share_a_batch(pipe, image):
    """A constrained sequence masks only its own logits row: a free greedy sequence decoded beside it
    gets exactly the tokens it gets alone, and the constrained one those it gets alone."""
    from llava_edge.runtime.constrain import cached_grammar
    from llava_edge.runtime.pipeline import Request

    free_alone = pipe.generate(image, "describe the image", 40)
    json_alone = pipe.generate(image, "where is it?", 120, json_schema=SCHEMA)
    engine = pipe.make_engine(max_slots=2)
    grammar = cached_grammar(pipe.tokenizer, frozenset(pipe.manifest.text.eos_token_ids), SCHEMA)
    free = engine.make_sequence(pipe.encode_request(Request([("describe the image", None)], [image])), [image],
                                GenerationParams(40))
    con = engine.make_sequence(pipe.encode_request(Request([("where is it?", None)], [image])), [image],
                               GenerationParams(120, grammar=grammar))
    list(engine.run_until_done([free, con]))
    assert free.generated == free_alone.token_ids
    assert con.generated == json_alone.token_ids

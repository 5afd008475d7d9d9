"""Pruning in the server: ``--prune`` is the default, a request's ``prune`` field overrides it, usage echoes
the image tokens the decoder read, a bad value is a 400 naming the field, and requests of different
settings about one picture (image cache and prefix cache on) each answer as ``Pipeline.generate`` would."""

from __future__ import annotations

import httpx
import pytest

from llava_edge.errors import UsageError
from llava_edge.runtime.pipeline import Pipeline
from llava_edge.runtime.prune import PruneSetting
from llava_edge.serve.settings import ServeConfig

from .conftest import Server
from .test_server import _images, user

TOKENS = 8


@pytest.fixture(scope="module")
def pruning_server(served_package, tmp_path_factory):
    srv = Server(served_package, "--max-slots", "2", "--prune", "dart:0.5", "--image-cache-mb", "16",
                 log=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.close()


def _post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)


def _body(question: str, image, prune: str | None = None, stream: bool = False) -> dict:
    body = {"model": "m", "temperature": 0, "max_tokens": TOKENS, "messages": user(question, image), "stream": stream}
    if prune is not None:
        body["prune"] = prune
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def test_default_override_usage_and_cache_separation(pruning_server, served_package):
    img = _images()[0]
    n = Pipeline.from_package(served_package, backend="ort-fast").manifest.vision.num_image_tokens
    refs = {s: Pipeline.from_package(served_package, backend="ort-fast", threads=1, prune=s, prefix_cache=0)
            for s in ("dart:0.5", "off", "cdpruner:0.75")}
    # the same picture, settings interleaved: each answer is its own setting's, whatever ran before
    for prune, question in [(None, "What is in the picture?"), ("off", "What is in the picture?"),
                            ("cdpruner:0.75", "What is in the picture?"), (None, "What is in the picture?"),
                            ("cdpruner:0.75", "Is there a square?"), ("off", "Is there a square?")]:
        r = _post(pruning_server, _body(question, img, prune))
        assert r.status_code == 200, r.text
        out = r.json()
        setting = prune or "dart:0.5"  # the server's default
        want = refs[setting].generate(img, question, TOKENS)
        assert out["choices"][0]["token_ids"] == want.token_ids, (prune, question)
        assert out["usage"]["image_tokens"] == PruneSetting.parse(setting).kept_count(n)
        assert out["usage"]["prompt_tokens"] == want.prompt_tokens


def test_streamed_usage_echoes_kept_tokens(pruning_server):
    with httpx.stream("POST", pruning_server.url + "/v1/chat/completions", timeout=60,
                      json=_body("Describe it.", _images()[1], "dart:0.75", stream=True)) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    import json

    usage = [json.loads(ln[6:]) for ln in lines if '"usage"' in ln][-1]["usage"]
    assert usage["image_tokens"] == PruneSetting.parse("dart:0.75").kept_count(36)


@pytest.mark.parametrize("value,words", [("dart:1", "[0, 1)"), ("fastv:0.5", "unknown prune method"),
                                         ("dart", "METHOD:RATIO"), (0.5, None)])
def test_bad_prune_is_a_400_naming_the_field(pruning_server, value, words):
    r = _post(pruning_server, {**_body("hi", _images()[0]), "prune": value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prune" and (words is None or words in err["message"])


def test_server_default_is_checked_at_start(served_package):
    with pytest.raises(UsageError, match="--prune"):
        ServeConfig(served_package, prune="dart:1.5").validate()
    ServeConfig(served_package, prune="cdpruner:0.5").validate()

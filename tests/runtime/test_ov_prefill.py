"""Prompt prefill on OpenVINO (runtime/ov_prefill.py, backends ort-fast-ov / ort-fast-int4-ov): long chunks run
the fast decoder graph in OpenVINO into onnxruntime's in-place cache, decode stays onnxruntime's. Held to
transformers' greedy tokens and logits like every backend, through one whole-prompt call, chunks that hand
the cache between the two runtimes, pruned prompts at their original positions and a crowded engine; the
rule that picks a runtime reads only the chunk's length."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from llava_edge.package import load_manifest
from llava_edge.runtime.backend import BackendError
from llava_edge.runtime.backends import open_backend, resolve_auto
from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.prune import PruneSetting

from prune_reference import hf_greedy, kept_prompt

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'llava-edge[openvino]')")

from llava_edge.runtime.ov_prefill import OV_MIN_PREFILL_TOKENS, PrefillEngine  # noqa: E402

TOKENS = 8
LOGITS_ATOL = 1e-4  # the runtime's logits against transformers' (tests/runtime/test_reference_parity.py)
Q = "what is in the picture ? describe every shape you see in it , its colour and where it is , then count them ."


@pytest.fixture(scope="module")
def pic():
    return Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 52, 3), dtype=np.uint8))


class Calls:
    """Which runtime took each prefill chunk (by its length)."""

    def __init__(self, backend):
        self.ov: list[int] = []
        self.ort: list[int] = []
        inner_ov, inner_slot = backend.ov_prefill.prefill, backend.prefill_slot

        def ov(buffers, slot, old, embeds, positions):
            self.ov.append(embeds.shape[1])
            return inner_ov(buffers, slot, old, embeds, positions)

        def slot(kv, s, embeds, positions=None):
            n = len(self.ov)
            out = inner_slot(kv, s, embeds, positions=positions)
            if len(self.ov) == n:
                self.ort.append(embeds.shape[1])
            return out

        backend.ov_prefill.prefill, backend.prefill_slot = ov, slot


def _pipe(pkg, backend: str, prune: str = "off") -> Pipeline:
    return Pipeline.from_package(pkg, backend=backend, threads=1, prune=PruneSetting.parse(prune), prefix_cache=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _generate(pipe: Pipeline, pic, chunk: int, questions: tuple[str, ...] = (Q,), slots: int = 1):
    """The questions' sequences (each with the picture) through one engine with this prefill chunk."""
    engine = pipe.make_engine(max_slots=slots, prefill_chunk=chunk)
    seqs = pipe.sequences([Request([(q, None)], [pic]) for q in questions], TOKENS, engine=engine, top_logprobs=1)
    list(engine.run_until_done(seqs))
    return seqs


@pytest.mark.parametrize("whole", [True, False])
def test_gives_transformers_tokens_and_logits(tiny_models, gqa_fast_package, pic, whole):
    """whole: the prompt in one OpenVINO call. Else chunks: OpenVINO chunks continuing each other's cache, and
    a last chunk too short for OpenVINO on onnxruntime continuing OpenVINO's, then onnxruntime's decode.
    Each case opens the graph in OpenVINO again in this process (a compiled-model cache, which gave other
    logits in openvino 2026.4.1, would fail the second)."""
    pipe = _pipe(gqa_fast_package, "ort-fast-ov")
    calls = Calls(pipe.backend)
    embeds, positions = kept_prompt(pipe, [pic], Q, PruneSetting())
    n = len(positions)
    # a chunk size leaving 2+ OpenVINO chunks and a tail under the threshold
    chunk = 256 if whole else next(c for c in range(OV_MIN_PREFILL_TOKENS + 1, n // 2 + 1)
                                   if 0 < n % c < OV_MIN_PREFILL_TOKENS)
    want, want_logits = hf_greedy(tiny_models["llava-hf-gqa"]["model"], embeds, positions, TOKENS,
                                  frozenset(pipe.manifest.text.eos_token_ids))
    (seq,) = _generate(pipe, pic, chunk)
    assert calls.ov == [min(chunk, n)] * max(n // chunk, 1)
    assert calls.ort == ([] if whole else [n % chunk])
    assert seq.generated == want
    for j, (lp, _) in enumerate(seq.logprobs):
        assert abs(lp - _log_softmax(want_logits[j])[want[j]]) < LOGITS_ATOL, j


def test_pruned_prompt_keeps_original_positions(tiny_models, gqa_fast_package, pic):
    s = PruneSetting.parse("dart:0.5")
    pipe = _pipe(gqa_fast_package, "ort-fast-ov", "dart:0.5")
    calls = Calls(pipe.backend)
    embeds, positions = kept_prompt(pipe, [pic], Q, s)
    assert positions[-1] + 1 > len(positions)  # a gap: the positions are not the cache indices
    want, _ = hf_greedy(tiny_models["llava-hf-gqa"]["model"], embeds, positions, TOKENS,
                        frozenset(pipe.manifest.text.eos_token_ids))
    (seq,) = _generate(pipe, pic, 256)
    assert calls.ov == [len(positions)] and seq.generated == want


def test_a_crowd_does_not_change_greedy_tokens(gqa_fast_package, pic):
    """Alone and with three other requests in a 4-slot engine, the same chunks go to the same runtime."""
    questions = (Q, "is there a circle ?", Q + " twice", "which colour is the largest shape in the picture ?")
    pipe = _pipe(gqa_fast_package, "ort-fast-ov")
    calls = Calls(pipe.backend)
    crowd = _generate(pipe, pic, 32, questions, slots=4)
    assert calls.ov and min(calls.ov) >= OV_MIN_PREFILL_TOKENS > max(calls.ort, default=0)
    alone = _pipe(gqa_fast_package, "ort-fast-ov")
    for q, seq in zip(questions, crowd):
        assert _generate(alone, pic, 32, (q,))[0].generated == seq.generated, q


@pytest.fixture(scope="module")
def int4_package(tiny_models, gqa_fast_package, tmp_path_factory):
    import shutil

    from llava_edge.export.fast_decoder import export_fast_decoder

    pkg = tmp_path_factory.mktemp("ov_int4") / "pkg"
    shutil.copytree(gqa_fast_package, pkg)
    export_fast_decoder(tiny_models["llava-hf-gqa"]["checkpoint"], pkg, quant="int4-rtn", block_size=32)
    return pkg


def test_int4_decoder_equals_onnxruntimes(int4_package, pic):
    """The int4 fast decoder (MatMulNBits) prefilled by OpenVINO: onnxruntime's own tokens and logits (on this
    tiny model both compute the int4 weights exactly; on edge-1b each quantizes activations to 8 bits its
    own way, ~5% of the logits' range apart, same argmax: docs/cpu.md "OpenVINO prefill")."""
    ort = _generate(_pipe(int4_package, "ort-fast-int4"), pic, 32)[0]
    pipe = _pipe(int4_package, "ort-fast-int4-ov")
    calls = Calls(pipe.backend)
    ov = _generate(pipe, pic, 32)[0]
    assert calls.ov and ov.generated == ort.generated
    for (a, _), (b, _) in zip(ov.logprobs, ort.logprobs):
        assert abs(a - b) < LOGITS_ATOL


def test_chosen_by_name_never_by_auto(gqa_fast_package):
    m = load_manifest(gqa_fast_package)
    assert resolve_auto(gqa_fast_package, m) == "ort-fast"
    assert open_backend("ort-fast", gqa_fast_package, m, threads=1).ov_prefill is None
    be = open_backend("ort-fast-ov", gqa_fast_package, m, threads=1)
    assert be.ov_prefill is not None and be.name.endswith("+openvino-prefill")
    assert be.ov_prefill.takes(OV_MIN_PREFILL_TOKENS) and not be.ov_prefill.takes(OV_MIN_PREFILL_TOKENS - 1)
    with pytest.raises(BackendError, match="no 'decoder_fast_int4' graph"):
        open_backend("ort-fast-int4-ov", gqa_fast_package, m, threads=1)
    with pytest.raises(ValueError):
        from llava_edge.runtime.fast_backend import FastOrtBackend

        FastOrtBackend(gqa_fast_package, m, threads=1, prefill="tensorflow")
    assert PrefillEngine("openvino") is PrefillEngine.OPENVINO


def test_without_openvino_the_error_names_the_extra(gqa_fast_package, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendError, match=r"pip install 'llava-edge\[openvino\]'.*--backend ort-fast-int4"):
        open_backend("ort-fast-ov", gqa_fast_package, load_manifest(gqa_fast_package), threads=1)

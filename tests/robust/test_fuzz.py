"""200 random malformed inputs (100 through `llava-edge run`, 100 through the Python API): truncated and
bit-flipped images and graphs, crafted image headers, random flag values, random bytes as prompts.
Each must end in a normal answer or a clear user error, never a traceback, and within a time bound."""

from __future__ import annotations

import io
import os
import json
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import app
from llava_edge.errors import UsageError
from llava_edge.package import PackageError

from .conftest import png_bytes

N_CLI = N_API = 100
BOUND_S = 20  # per input; a hang fails the test instead of the whole run

FLAGS = ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--repetition-penalty", "--threads",
         "--stop", "--max-image-pixels"]
GOOD = {"--max-new-tokens": "2", "--temperature": "0.7", "--top-p": "0.9", "--top-k": "5", "--seed": "1",
        "--repetition-penalty": "1.1", "--threads": "1", "--stop": ".", "--max-image-pixels": "1000000"}
VALUES = ["abc", "-1", "0", "1", "2", "nan", "inf", "-inf", "1e309", "", "0.5", "3", "1e-300", "-0",
          "99999999999999999999", "\udcff", "0x10", " 2"]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


@pytest.fixture
def bounded():
    previous = signal.signal(signal.SIGALRM, _alarm)

    def run(fn):
        signal.setitimer(signal.ITIMER_REAL, BOUND_S)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    yield run
    signal.signal(signal.SIGALRM, previous)


def _good_images(rng: random.Random) -> list[bytes]:
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        buf = io.BytesIO()
        arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255,
                                                                     (rng.randint(1, 60), rng.randint(1, 60), 3),
                                                                     dtype=np.uint8)
        Image.fromarray(arr).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _mangle(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "flip", "garbage-tail", "as-is"])
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "garbage-tail":
        return data[: len(data) // 2] + rng.randbytes(rng.randint(0, 200))
    return data


def _image(rng: random.Random, good: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.6:
        return _mangle(rng, rng.choice(good))
    if kind < 0.8:
        w, h = (rng.choice([0, 1, 7, 4000, 12000, 65535, 100000, 2**31 - 1]),
                rng.choice([0, 1, 9, 5000, 20000, 2**31 - 1]))
        return png_bytes(w, h)
    return rng.randbytes(rng.randint(0, 300))


def _prompt(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:  # random bytes, as argv hands them to Python (no NUL possible there)
        return rng.randbytes(rng.randint(0, 40)).replace(b"\0", b"").decode("utf-8", "surrogateescape")
    if kind < 0.6:
        return rng.choice(["", " ", "\n", "what is it?", "🦙" * 5, "é" * 30, "a " * 300, "</s><image>USER:"])
    return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 20)))


@pytest.fixture(scope="session")
def broken_packages(pkg, tmp_path_factory) -> list[Path]:
    """The package with a graph bit-flipped, truncated or its header smashed, and a garbage manifest."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("fuzz_pkgs")
    out = []
    for i, (graph, how) in enumerate([("decoder", "flip"), ("vision", "flip"), ("embed", "truncate"),
                                      ("decoder", "header"), ("manifest", "garbage")]):
        d = root / f"p{i}"
        shutil.copytree(pkg, d)
        path = d / ("manifest.json" if graph == "manifest" else f"{graph}.onnx")
        data = bytearray(path.read_bytes())
        if how == "flip":
            for _ in range(8):
                data[rng.randrange(len(data))] ^= 0xFF
        elif how == "truncate":
            data = data[: len(data) // 3]
        elif how == "header":
            data[:32] = rng.randbytes(32)
            m = json.loads((d / "manifest.json").read_text())
            m.pop("digests")  # an older package: nothing to compare against, onnxruntime must fail clearly
            (d / "manifest.json").write_text(json.dumps(m))
        else:
            data = bytearray(rng.randbytes(200))
        path.write_bytes(bytes(data))
        out.append(d)
    return out


def _is_clear(result) -> bool:
    if result.exit_code == 0:
        return True
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    return result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output


def test_fuzz_cli_run(runner, pkg, broken_packages, tmp_path, bounded):
    rng = random.Random(int(os.environ.get("FUZZ_SEED", 2024)))
    good = _good_images(rng)
    outcomes = {"answer": 0, "error": 0}
    for i in range(N_CLI):
        package = rng.choice(broken_packages) if rng.random() < 0.15 else pkg
        argv = ["run", str(package), "-p", _prompt(rng) if rng.random() < 0.4 else "what is it?"]
        if rng.random() < 0.85:
            img = tmp_path / f"img{i}"
            img.write_bytes(rng.choice(good) if rng.random() < 0.35 else _image(rng, good))
            argv += ["-i", str(img)]
        flags = rng.sample(FLAGS, rng.randint(0, 3))
        for flag in flags:  # a sensible value half the time, so answers happen too
            argv += [flag, rng.choice(VALUES) if rng.random() < 0.5 else GOOD[flag]]
        if "--max-new-tokens" not in flags:
            argv += ["--max-new-tokens", "3"]
        t0 = time.monotonic()
        result = bounded(lambda: runner.invoke(app, argv))
        assert _is_clear(result), (argv, result.output, result.exception)
        assert time.monotonic() - t0 < BOUND_S
        outcomes["answer" if result.exit_code == 0 else "error"] += 1
    print("cli fuzz:", outcomes)
    assert outcomes["answer"] >= 10 and outcomes["error"] >= 30, outcomes  # the mix exercises both ends


def test_fuzz_python_api(pkg, broken_packages, bounded):
    from llava_edge.runtime.pipeline import Pipeline
    from llava_edge.runtime.sampling import SamplingConfig

    rng = random.Random(int(os.environ.get("FUZZ_SEED", 99)))
    good = _good_images(rng)
    pipe = Pipeline.from_package(pkg)
    numbers = [0, 1, -1, 0.5, 2, float("nan"), float("inf"), 1e-300, 10**20, "3", None, True]
    outcomes = {"answer": 0, "error": 0}
    for i in range(N_API):
        kind = rng.random()
        if kind < 0.05:  # a broken package
            call = lambda d=rng.choice(broken_packages): Pipeline.from_package(d)  # noqa: E731
        else:
            if kind < 0.6:
                image = _image(rng, good)
            elif kind < 0.7:
                shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
                image = (np.random.default_rng(i).random(shape) * 255).astype(
                    rng.choice([np.uint8, np.uint8, np.float32, np.int64]))
            elif kind < 0.8:
                image = Image.new(rng.choice(["RGB", "L", "La", "I;16", "F", "CMYK", "P", "1"]),
                                  (rng.randint(0, 9), rng.randint(0, 9)))
            else:
                image = rng.choice([None, 3, "nope.png", b""])
            # each part is well-formed three times in four, so answers happen too
            ok = lambda: rng.random() < 0.75  # noqa: E731
            if ok():
                image = rng.choice(good)
            prompt = "describe" if ok() else rng.choice([_prompt(rng), rng.randbytes(rng.randint(0, 20)), None, 5])
            kwargs = {}
            if not ok():
                kwargs = {k: rng.choice(numbers) for k in rng.sample(["temperature", "top_p", "top_k", "seed",
                                                                       "repetition_penalty"], rng.randint(1, 3))}
            stop = () if ok() else rng.choice([("",), ("\udcff",), (".",), "x"])
            max_new = 2 if ok() else rng.choice([1, 3, 0, -5, 2.5, "2"])

            def call(image=image, prompt=prompt, kwargs=kwargs, stop=stop, max_new=max_new):
                return pipe.generate(image, prompt, max_new_tokens=max_new, sampling=SamplingConfig(**kwargs),
                                     stop=stop)
        try:
            bounded(call)
            outcomes["answer"] += 1
        except (UsageError, PackageError):
            outcomes["error"] += 1
    print("api fuzz:", outcomes)
    assert outcomes["answer"] >= 5 and outcomes["error"] >= 30, outcomes

"""`llava-edge watch`: one JSON line per sampled frame, unchanged frames not re-encoded, answers equal to
Pipeline.generate on each frame alone. The video is made here with PyAV (lossless FFV1, so the decoded
frames are the pixels written) from the shipped model's synthetic scenes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llava_edge.cli import app

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "what color is the shape?"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    from llava_edge.demo import ASSET
    from llava_edge.export.exporter import export_package

    pkg = tmp_path_factory.mktemp("watch") / "tiny-llava"
    export_package(ASSET, pkg)
    return pkg


@pytest.fixture(scope="module")
def pipe(package):
    from llava_edge.runtime.pipeline import Pipeline

    return Pipeline.from_package(package, threads=1)


def _scenes(n: int) -> list:
    from llava_edge.synthetic.data import generate_sample

    return [generate_sample(5, i).image.convert("RGB") for i in range(n)]


def _watch(package: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llava_edge.cli", "watch", str(package), "--threads", "1", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_video_twenty_seconds(package, pipe, tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")
    scenes = _scenes(10)
    video = tmp_path / "scenes.mkv"
    with av.open(str(video), "w") as c:  # 20 s at 2 fps: each scene held 2 s (4 frames)
        s = c.add_stream("ffv1", rate=2)
        s.width, s.height = scenes[0].size
        s.pix_fmt = "bgr0"
        for i in range(40):
            for p in s.encode(av.VideoFrame.from_image(scenes[i // 4])):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    r = _watch(package, "--source", str(video), "--every", "1", "--prompt", PROMPT, "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 20
    assert [x["time"] for x in lines] == [float(i) for i in range(20)]
    # a scene lasts two samples: the second one is not encoded again
    assert [x["reused"] for x in lines] == [i % 2 == 1 for i in range(20)]
    assert lines[-1]["encoded"] == 10 and lines[-1]["reused_total"] == 10
    assert all(x["difference"] == 0.0 for x in lines[1::2])
    assert all(x["difference"] > 1.0 for x in lines[2::2])
    expected = [pipe.generate(im, PROMPT, 8).text for im in scenes]
    assert [x["answer"] for x in lines] == [expected[i // 2] for i in range(20)]
    assert len(set(expected)) > 1  # the scenes really get different answers


def test_directory_source_threshold(package, pipe, tmp_path):
    a, b = _scenes(2)
    noisy = np.asarray(a).astype(np.int16)
    noisy[::7, ::5] += 40  # a small change: mean difference well under 1.0 but not zero
    frames = [a, a, Image_from(np.clip(noisy, 0, 255)), b, a]
    for i, im in enumerate(frames):
        im.save(tmp_path / f"{i:03d}.png")
    r = _watch(package, "--source", str(tmp_path), "--every", "0.5", "--prompt", PROMPT, "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["time"] for x in lines] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [x["reused"] for x in lines] == [False, True, True, False, False]
    assert 0 < lines[2]["difference"] < 1.0
    assert lines[-1]["encoded"] == 3 and lines[-1]["reused_total"] == 2
    r0 = _watch(package, "--source", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "6",
                "--threshold", "0", "--max-frames", "3")
    assert [json.loads(x)["reused"] for x in r0.stdout.splitlines()] == [False, True, False]
    ans_a, ans_b = pipe.generate(a, PROMPT, 6).text, pipe.generate(b, PROMPT, 6).text
    assert [x["answer"] for x in lines] == [ans_a, ans_a, ans_a, ans_b, ans_a]


def Image_from(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr.astype(np.uint8))


def test_bad_sources_are_one_line_errors(package, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video" * 50)
    empty = tmp_path / "empty"
    empty.mkdir()
    schema = tmp_path / "s.json"
    schema.write_text('{"not": {"type": "string"}}')
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _scenes(1)[0].save(imgs / "a.png")
    cases = [(["--source", str(tmp_path / "missing.mp4")], "source not found"),
             (["--source", "/dev/video97"], "source not found"),
             (["--source", str(empty)], "no images"),
             (["--source", str(imgs), "--every", "0"], "--every"),
             # a schema llguidance cannot implement
             (["--source", str(imgs), "--json-schema", str(schema)], "unsupported JSON schema")]
    try:
        import av  # noqa: F401

        cases.append((["--source", str(bad)], "cannot open video source"))
    except ImportError:
        pass
    # the first through a real process (exit status, stderr, nothing on stdout); the rest in this one
    # (the same CLI entry point and error path; a process start costs ~0.5 s each)
    r = _watch(package, "--prompt", PROMPT, *cases[0][0])
    results = [(r.returncode, r.stderr, r.stdout)]
    runner = CliRunner()
    for args, _ in cases[1:]:
        r = runner.invoke(app, ["watch", str(package), "--threads", "1", "--prompt", PROMPT, *args])
        results.append((r.exit_code, r.stderr, r.stdout))
    for (args, words), (code, stderr, stdout) in zip(cases, results):
        err = stderr.strip()
        assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (args, stderr)
        assert words in err, (args, err)
        assert stdout == ""

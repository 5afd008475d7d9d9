"""Images (pixel limit from the header, 16-bit scaling, modes), chat resilience, progress lines."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from llava_edge.cli import app
from llava_edge.errors import ImageError, ImageTooLargeError, TextInputError
from llava_edge.runtime.inputs import check_stop, check_text
from llava_edge.runtime.preprocess import load_image, to_rgb

from .conftest import png_bytes


def test_pixel_limit_is_read_from_the_header_and_configurable():
    header = png_bytes(12000, 12000)  # 144M pixels declared, a few bytes of data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must never surface
        with pytest.raises(ImageTooLargeError, match="12000x12000"):
            load_image(header)
        with pytest.raises(ImageTooLargeError, match="decompression bomb"):
            load_image(png_bytes(100000, 100000))
        with pytest.raises(ImageTooLargeError, match="over the limit of 100 pixels"):
            load_image(png_bytes(200, 100, bytes(26 * 100)), max_pixels=100)
    assert load_image(png_bytes(200, 100, bytes(26 * 100)), max_pixels=20000).size == (200, 100)
    assert load_image(png_bytes(200, 100, bytes(26 * 100)), max_pixels=None).size == (200, 100)


def test_an_elongated_image_is_refused_before_padding_it(tiny_models):
    from llava_edge.package import load_manifest
    from llava_edge.runtime.preprocess import preprocess

    vision = load_manifest(tiny_models["llava-hf-v1.5"]["package"]).vision
    assert vision.pad_to_square
    strip = load_image(png_bytes(1, 20000))  # 20000 pixels, but 400M once padded to a square
    with pytest.raises(ImageTooLargeError, match="too elongated: padded to a square it is 20000x20000"):
        preprocess(strip, vision)
    assert preprocess(load_image(png_bytes(1, 200)), vision).shape == (3, vision.image_size, vision.image_size)


def test_python_api_takes_the_limit(tiny_models):
    from llava_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(tiny_models["llava-hf-v1.5"]["package"], max_image_pixels=1000)
    with pytest.raises(ImageTooLargeError):
        pipe.generate(png_bytes(200, 100, bytes(26 * 100)), "hi", max_new_tokens=1)
    assert pipe.generate(png_bytes(20, 10, bytes(4 * 10)), "hi", max_new_tokens=1).token_ids


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_not_clipped(mode):
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    img = Image.fromarray(ramp)  # I;16
    if mode == "I;16":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        img = load_image(buf.getvalue())  # a 16-bit PNG from disk
    else:
        img = img.convert("I")  # how older PIL versions open 16-bit PNGs
    assert img.mode == mode
    rgb = to_rgb(img)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 120 < rgb[4, 0, 0] < 136  # mid-grey stays mid-grey (PIL's own convert clips it to 255)


def test_image_errors_are_image_errors():
    with pytest.raises(ImageError, match="unsupported image mode 'La'"):
        to_rgb(Image.new("La", (4, 4)))
    with pytest.raises(ImageError, match="arrays must be uint8"):
        load_image(np.zeros((4, 4, 7), dtype=np.uint8))
    with pytest.raises(ImageError, match="not int"):
        load_image(3)
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(b"\x89PNG\r\n\x1a\nnot really")


def test_text_checks():
    assert check_text("café".encode()) == "café"
    with pytest.raises(TextInputError, match="byte 0xff at offset 2"):
        check_text(b"ok\xff")
    with pytest.raises(TextInputError, match=r"byte 0xe9 at character 3"):
        check_text("caf\udce9", "--prompt")  # how Python hands invalid UTF-8 in argv
    with pytest.raises(TextInputError, match="empty"):
        check_stop(["x", ""])


def test_chat_survives_bad_lines_and_keeps_the_newest_turns(runner, pkg, image_file, tmp_path):
    long_turn = "tell me about the picture " * 6
    lines = [
        b"/foo",
        b"/image " + str(tmp_path / "missing.png").encode(),
        b"/image " + str(image_file).encode(),
        b"caf\xe9 \xff broken utf-8",
        *[long_turn.encode()] * 9,
        b"/quit",
    ]
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(3000, 1000))
    lines.insert(3, b"/image " + str(big).encode())  # over --max-image-pixels: refused, the old image kept
    r = runner.invoke(app, ["chat", str(pkg), "--max-new-tokens", "4", "--max-image-pixels", "2000000"],
                      input=b"\n".join(lines) + b"\n")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "unknown command /foo; commands: /image PATH, /reset, /quit" in text
    assert "image not found" in text
    assert f"image {image_file} (40x30); conversation reset" in text
    assert "is 3000x1000 (3.0M pixels), over the limit of 2.0M pixels" in text
    assert "the line is not valid UTF-8 (byte 0xe9" in text
    assert r.output.count("llava>") == 9  # every long turn answered: none failed on the context
    assert text.count("dropping the oldest turns") == 1  # said once
    assert "Traceback" not in r.output


def test_chat_line_longer_than_the_context_is_refused_and_the_session_goes_on(runner, pkg):
    r = runner.invoke(app, ["chat", str(pkg), "--max-new-tokens", "4"], input="word " * 400 + "\nhello\n/quit\n")
    assert r.exit_code == 0, r.output
    assert "more than the model's context of 256; shorten it" in " ".join(r.output.split())
    assert r.output.count("llava>") == 1


def test_progress_lines_when_output_is_not_a_terminal(capsys):
    from rich.console import Console

    from llava_edge.progress import Stages, progress_iter

    console = Console(file=io.StringIO(), force_terminal=False)
    assert list(progress_iter(list(range(5)), "layers", console=console, every_s=0.0)) == list(range(5))
    with Stages(console).running() as stage:
        stage("export vision")
        stage("verify vision")
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "layers: 0/5" and lines[5].startswith("layers: 5/5")
    assert lines[6:] == ["export vision ...", lines[7], "verify vision ...", lines[9]]
    assert lines[7].startswith("export vision: done in") and lines[9].startswith("verify vision: done in")


def test_eval_shows_progress(capsys):
    from llava_edge.synthetic.evaluate import evaluate

    evaluate(lambda image, question: "1", n=2, with_blind=False, progress=True)
    assert "eval: 2 scenes: 2/2" in capsys.readouterr().err

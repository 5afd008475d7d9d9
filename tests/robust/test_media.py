"""The server's image loader against hostile names and images (issue 24): serve/media.py, called directly.

Every bad input must be one ApiError with a 4xx status, never another exception (the server's 500), and
a file outside --media-dir must never be read, even while a directory is swapped for a symlink.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from llava_edge.package import VisionConfig
from llava_edge.serve.media import MediaLimits, load_image_url
from llava_edge.serve.protocol import ApiError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="symlinks, FIFOs and openat: POSIX")


def png(width: int, height: int, depth: int = 8, colour: int = 2, data: bool = True) -> bytes:
    """A PNG of zeros (colour type 0 grey, 2 RGB, 6 RGBA); data=False: the header and a few bytes only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    if data:
        z = zlib.compressobj(9)
        row = b"\x00" * (1 + width * channels * depth // 8)
        idat = b"".join([z.compress(row) for _ in range(height)] + [z.flush()])
    else:
        idat = zlib.compress(b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, prefix: str = "data:image/png;base64,") -> str:
    return prefix + base64.b64encode(data).decode()


RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture
def media(tmp_path) -> tuple[MediaLimits, Path, Path]:
    """(limits over tmp/media, the media dir, a secret image outside it)."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(solid(RED))
    (root / "sub" / "img.png").write_bytes(solid(RED))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "img.png").write_bytes(solid(BLUE))
    return MediaLimits(media_dir=root), root, outside


def refused(url: str, limits: MediaLimits, status: int = 400, code: str | None = "invalid_image_url",
            match: str = "", budget=None) -> ApiError:
    with pytest.raises(ApiError) as info:
        load_image_url(url, limits, budget)
    e = info.value
    assert e.status == status and (code is None or e.code == code) and match in e.message, (url[:100], e.status,
                                                                                            e.code, e.message)
    assert len(e.message) < 600  # a 5000-character name is not echoed back whole
    return e


def test_a_file_in_the_media_dir_loads_by_name_path_and_file_url(media):
    limits, root, _ = media
    for url in ("ok.png", "  sub/img.png\n", "./sub//img.png", str(root / "ok.png"), f"file://{root}/sub/img.png",
                "FILE:ok.png", f"file://{root}/sub/%69mg.png"):
        assert load_image_url(url, limits).getpixel((0, 0)) == RED, url


def test_links_and_names_outside_the_media_dir_are_refused(media):
    limits, root, outside = media
    (root / "out").symlink_to(outside)
    (root / "out.png").symlink_to(outside / "img.png")
    (root / "inside.png").symlink_to(root / "ok.png")  # stays inside, refused all the same (documented)
    (root / "loop").symlink_to(root / "loop")
    (root / "zero").symlink_to("/dev/zero")
    for url in ("out/img.png", "out.png", "inside.png", "loop", "loop/x.png", "zero"):
        refused(url, limits, match="symbolic link")
    refused("../outside/img.png", limits, match="outside the media directory")
    refused(str(outside / "img.png"), limits, match="outside the media directory")
    refused(f"file://{outside}/img.png", limits, match="outside the media directory")
    refused("file://otherhost/ok.png", limits, match="another host")
    refused("nope.png", limits, match="not found")
    refused("ok.png/x", limits)
    refused("sub", limits, match="not a regular file")
    refused(".", limits, match="media directory itself")


def test_bad_names_are_400s_not_500s(media):
    limits, root, _ = media
    for url in ("ok.png\x00.txt", "sub/\x00", "file:ok%00.png", "a" * 5000, "sub/" + "b" * 300, "x/" * 2000,
                "\ud800.png", "", "   ", "file://[bad/ok.png"):
        refused(url, limits, code=None)


def test_fifos_and_devices_are_not_regular_files(media):
    limits, root, _ = media
    os.mkfifo(root / "fifo.png")
    t0 = time.perf_counter()
    refused("fifo.png", limits, match="not a regular file")
    assert time.perf_counter() - t0 < 1  # nothing waits for a writer


def test_without_media_dir_local_paths_are_refused():
    refused("ok.png", MediaLimits(), code="unsupported_image_url")


def test_schemes_are_case_insensitive_and_whitespace_is_stripped(media):
    limits, _, _ = media
    red = solid(RED)
    for url in (data_url(red, "DATA:image/png;BASE64,"), " " + data_url(red, " data:image/png;base64,") + "\n",
                data_url(red, "Data:IMAGE/PNG;Base64,")):
        assert load_image_url(url, limits).getpixel((0, 0)) == RED
    for url in ("HTTPS://example.com/cat.png", " http://example.com/x.png", "ftp://example.com/x.png"):
        refused(url, limits, code="unsupported_image_url")
    refused("DATA:image/png," + "x" * 10, limits, match="must be base64")


def test_swapping_a_directory_for_a_symlink_never_reads_outside(media):
    """A thread flips media/sub between the real directory and a link to outside/ while the main thread
    loads sub/img.png: every answer is the inside image or an ApiError; the outside image never."""
    limits, root, outside = media
    sub, parked = root / "sub", root / "parked"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(sub, parked)
            os.symlink(outside, sub)
            os.unlink(sub)
            os.rename(parked, sub)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    ok = bad = 0
    try:
        t0 = time.perf_counter()
        while ok + bad < 300 or time.perf_counter() - t0 < 1.0:
            try:
                img = load_image_url("sub/img.png", limits)
            except ApiError as e:
                assert e.status == 400 and e.code == "invalid_image_url", e.message
                bad += 1
            else:
                assert img.getpixel((0, 0)) == RED, "read the image outside the media directory"
                ok += 1
            if time.perf_counter() - t0 > 5:
                break
    finally:
        stop.set()
        flipper.join()
    assert ok + bad >= 300 and ok > 0, (ok, bad)


@pytest.mark.parametrize("vision", [None, "pad", "crop"])
def test_an_elongated_image_is_a_400_before_decoding(vision):
    cfg = None if vision is None else VisionConfig(
        image_size=336, patch_size=14, shortest_edge=336, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        rescale_factor=1 / 255, resample=3, do_center_crop=True, pad_to_square=vision == "pad", num_image_tokens=576,
        vision_feature_layer=-2, select_strategy="default")
    limits = MediaLimits(vision=cfg)
    for w, h in ((1, 50000), (50000, 1)):
        t0 = time.perf_counter()
        refused(data_url(png(w, h, 1, 0, data=False)), limits, code="invalid_image", match="too elongated")
        assert time.perf_counter() - t0 < 0.5
    assert load_image_url(data_url(png(400, 100, 8, 2)), limits).size == (400, 100)


def test_16_bit_giants_are_refused_from_the_header_by_the_request_budget():
    """Four 70 KB 16-bit 6000x6000 PNGs used to cost 1.1 GB and 11 s: one fits a request's budget (216 MB
    of the default 256 MB), the second is a 413 from its header."""
    limits = MediaLimits()
    giant = data_url(png(6000, 6000, 16, 0))
    assert len(giant) < 100_000
    budget = limits.new_budget()
    assert load_image_url(giant, limits, budget).size == (6000, 6000)
    assert budget.spent == 6000 * 6000 * 3 * 2
    t0 = time.perf_counter()
    for _ in range(3):
        refused(giant, limits, 413, "image_too_large", "budget of 256 MB per request", budget)
    assert time.perf_counter() - t0 < 1
    # alone, a 16-bit RGBA one is over the budget: refused from the header (no pixel data in it at all)
    t0 = time.perf_counter()
    refused(data_url(png(6000, 6000, 16, 6, data=False)), limits, 413, "image_too_large", "288 MB")
    assert time.perf_counter() - t0 < 1


def test_the_budget_sums_a_requests_images_and_each_request_starts_afresh():
    limits = MediaLimits(max_request_pixel_bytes=3 * 100 * 100 * 3)
    url = data_url(png(100, 100, 8, 0))  # grey: counted as 3 channels, it becomes RGB
    budget = limits.new_budget()
    for _ in range(3):
        load_image_url(url, limits, budget)
    refused(url, limits, 413, "image_too_large", "earlier images", budget)
    load_image_url(url, limits, limits.new_budget())
    load_image_url(url, limits)  # no budget: the image alone is checked
    assert MediaLimits(max_request_pixel_bytes=None).new_budget().limit is None


def test_existing_limits_still_answer_as_before(media):
    limits, root, _ = media
    refused(data_url(png(12000, 12000, 1, 0, data=False)), limits, 413, "image_too_large", "over the limit")
    refused(data_url(b"x" * 500), limits, code="invalid_image")
    refused("data:image/png;base64,@@@", limits, code="invalid_base64")
    small = MediaLimits(max_image_bytes=20, media_dir=root)
    refused("ok.png", small, 413, "image_too_large")
    refused(data_url(solid(RED, (50, 50))), small, 413, "image_too_large")

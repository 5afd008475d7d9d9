"""Frame sources for `watch`: a video file, a camera (/dev/videoN), a network stream, or a directory of images.

Why frame timestamps decide sampling (not the wall clock): a file is then sampled the same way however
fast the machine decodes it, and a live source's timestamps advance with real time anyway. Video goes
through PyAV (the `video` extra), imported only when a video source is opened; a directory of images
needs nothing more than Pillow and is sampled one image per interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


class SourceError(UsageError):
    """A source that is missing or cannot be read: one `error:` line."""


@dataclass
class Frame:
    time: float  # seconds from the start of the source
    image: Image.Image  # RGB


def open_frames(source: str, every: float) -> Iterator[Frame]:
    """Frames sampled every ``every`` seconds of source time (the first frame at or after each multiple)."""
    if every <= 0:
        raise UsageError("--every must be > 0 seconds")
    path = Path(source)
    if not source.startswith(STREAM_SCHEMES):
        if not path.exists():
            raise SourceError(f"source not found: {source}")
        if path.is_dir():
            return _directory(path, every)
    return _video(source, every)


def _directory(path: Path, every: float) -> Iterator[Frame]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")

    def frames() -> Iterator[Frame]:
        for i, p in enumerate(files):
            try:
                with Image.open(p) as im:
                    image = im.convert("RGB")
            except OSError as e:
                raise SourceError(f"cannot read image {p}: {e}") from None
            yield Frame(i * every, image)

    return frames()


def _video(source: str, every: float) -> Iterator[Frame]:
    try:
        import av
    except ImportError:
        raise SourceError('video sources need PyAV: pip install "llava-edge[video]"') from None
    options = {}
    fmt = None
    if source.startswith("/dev/video"):
        fmt = "v4l2"
    elif source.startswith(("rtsp://", "rtsps://")):
        options = {"rtsp_transport": "tcp"}
    try:
        container = av.open(source, format=fmt, options=options, timeout=10.0)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"cannot open video source {source}: {e}") from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"{source} has no video stream")

    def frames() -> Iterator[Frame]:
        start = None
        next_t = 0.0
        try:
            for frame in container.decode(video=0):
                t = frame.time if frame.time is not None else 0.0
                start = t if start is None else start
                t -= start
                if t + 1e-6 < next_t:
                    continue
                yield Frame(t, frame.to_image().convert("RGB"))
                while next_t <= t + 1e-6:
                    next_t += every
        except av.FFmpegError as e:
            raise SourceError(f"cannot read video {source}: {e}") from None
        finally:
            container.close()

    return frames()

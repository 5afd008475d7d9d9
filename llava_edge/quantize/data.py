"""Calibration conversations: where GPTQ's Hessians come from.

GPTQ is only as good as the activations it sees, so calibration for a VLM must run images through
the vision tower and projector: the decoder's inputs on image-token positions look nothing like
text embeddings. Every source below yields :class:`Conversation` objects (an optional image and a
list of question/answer turns); :mod:`.capture` turns them into model inputs.

Sources (``--calib``):

* ``None`` / ``"synthetic"``: the default, pluggable source (``register_source``). It uses the
  project's scene generator (``llava_edge.synthetic``) when it is installed and otherwise the small
  built-in coloured-shapes generator below (``"shapes"``). Deterministic in ``seed``.
* a LLaVA-Instruct style ``.json`` (a list) or ``.jsonl`` (one object per line) with ``image``
  (a path relative to the image folder) and ``conversations`` (``from``: human/gpt, ``value``).
* a folder: of images with prompts (``name.txt`` next to ``name.png`` holds the question, or one
  ``prompts.txt`` with a question per line used round-robin, or built-in prompts), or holding a
  single LLaVA-Instruct json/jsonl whose images are relative to the folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_PLACEHOLDER = "<image>"


class CalibrationDataError(UsageError):
    """The calibration data cannot be read or yields no usable sample."""


@dataclass
class Conversation:
    """One calibration example. ``turns`` are (question, answer); the answer may be empty."""

    turns: list[tuple[str, str]]
    image: Image.Image | None = None
    source: str = ""  # where it came from, for error messages
    meta: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------------
# Built-in synthetic source: coloured shapes with templated questions.

_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle")
_BACKGROUNDS = ((200, 200, 200), (120, 120, 120), (250, 240, 220), (30, 40, 60))


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shapes_sample(seed: int, index: int, size: int = 336) -> Conversation:
    """Sample ``index`` of the built-in set: 1-3 shapes on a plain background, two QA turns."""
    rng = np.random.default_rng([seed, index])
    img = Image.new("RGB", (size, size), _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))])
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, 4))
    names = list(_COLOURS)
    objects = []
    for slot in rng.permutation(4)[:n]:
        colour = names[int(rng.integers(len(names)))]
        kind = _SHAPES[int(rng.integers(len(_SHAPES)))]
        cx, cy = (slot % 2) * size // 2 + size // 4, (slot // 2) * size // 2 + size // 4
        r = int(rng.integers(size // 12, size // 5))
        _draw(draw, kind, (cx - r, cy - r, cx + r, cy + r), _COLOURS[colour])
        objects.append((colour, kind, ("top" if slot < 2 else "bottom") + (" left" if slot % 2 == 0 else " right")))
    listing = ", ".join(f"a {c} {k}" for c, k, _ in objects)
    colour, kind, where = objects[int(rng.integers(len(objects)))]
    turns = [
        ("Describe the image.", f"The image shows {listing}."),
        (f"Where is the {colour} {kind}?", f"The {colour} {kind} is in the {where}."),
        ("How many shapes are there?", f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''}."),
    ]
    order = rng.permutation(len(turns))[:2]
    return Conversation(turns=[turns[int(i)] for i in order], image=img, source=f"shapes[{seed}:{index}]")


def shapes_source(n: int, seed: int) -> list[Conversation]:
    return [shapes_sample(seed, i) for i in range(n)]


def project_synthetic_source(n: int, seed: int) -> list[Conversation]:
    """The project's scene generator (llava_edge.synthetic), when present."""
    from llava_edge.synthetic import data as synth  # type: ignore[import-not-found]

    out = []
    for i, s in enumerate(synth.generate(seed, n)):
        turns = [(t.question, t.answer) for t in s.turns] or [("Describe the image.", s.caption)]
        turns = [("Describe the image.", s.caption)] + turns[:2] if i % 2 == 0 else turns[:3]
        out.append(Conversation(turns=turns, image=s.image, source=f"synthetic[{seed}:{i}]"))
    return out


def default_source(n: int, seed: int) -> list[Conversation]:
    try:
        return project_synthetic_source(n, seed)
    except (ImportError, AttributeError):
        return shapes_source(n, seed)


SOURCES: dict[str, Callable[[int, int], list[Conversation]]] = {
    "synthetic": default_source,
    "shapes": shapes_source,
}


def register_source(name: str, fn: Callable[[int, int], list[Conversation]]) -> None:
    """Plug in another named source: ``fn(n, seed) -> list[Conversation]``."""
    SOURCES[name] = fn


# -------------------------------------------------------------------------------------------
# Files.

DEFAULT_PROMPTS = (
    "Describe the image in detail.",
    "What is in this picture?",
    "What colours are the objects in the image?",
    "Is there anything unusual about this image?",
)


def _strip_placeholder(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def parse_llava_record(rec: dict, image_root: Path | None, where: str) -> Conversation:
    """One LLaVA-Instruct record -> Conversation. Turns alternate human/gpt; a trailing human turn
    becomes a question with an empty answer."""
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise CalibrationDataError(f"{where}: record has no 'conversations' list")
    turns: list[tuple[str, str]] = []
    question: str | None = None
    for msg in convs:
        role = str(msg.get("from", msg.get("role", ""))).lower()
        value = str(msg.get("value", msg.get("content", "")))
        if role in ("human", "user"):
            if question is not None:
                turns.append((question, ""))
            question = _strip_placeholder(value)
        elif role in ("gpt", "assistant"):
            turns.append((question or "", value.strip()))
            question = None
    if question is not None:
        turns.append((question, ""))
    image = None
    if rec.get("image"):
        root = image_root if image_root is not None else Path(".")
        path = root / str(rec["image"])
        if not path.is_file():
            raise CalibrationDataError(f"{where}: image {path} not found (image folder: {root})")
        image = Image.open(path).convert("RGB")
    return Conversation(turns=turns, image=image, source=f"{where}:{rec.get('id', '')}")


def read_llava_json(path: Path, image_root: Path | None = None) -> list[dict]:
    """Records of a .json (list, or {"data": [...]}) or .jsonl file, not yet decoded (images are
    opened only for the records that get selected)."""
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
            if isinstance(records, dict):
                records = records.get("data", records.get("annotations"))
    except json.JSONDecodeError as e:
        raise CalibrationDataError(f"{path} is not valid JSON/JSONL: {e}") from e
    if not isinstance(records, list):
        raise CalibrationDataError(f"{path}: expected a list of LLaVA-Instruct records")
    return records


def _image_root_for(path: Path, image_folder: Path | None) -> Path:
    if image_folder is not None:
        return image_folder
    for cand in (path.parent / "images", path.parent):
        if cand.is_dir():
            return cand
    return path.parent


def _folder_conversations(folder: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationDataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no json/jsonl")
    prompts_file = folder / "prompts.txt"
    shared = ([line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
              if prompts_file.is_file() else [])
    shared = shared or list(DEFAULT_PROMPTS)
    out = []
    for i, img in enumerate(images):
        side = img.with_suffix(".txt")
        out.append((img, side.read_text().strip() if side.is_file() else shared[i % len(shared)]))
    return out


def load_calibration(
    source: str | Path | None, n: int, seed: int = 0, image_folder: str | Path | None = None
) -> list[Conversation]:
    """``n`` conversations from ``source`` (see module docstring); file sources are shuffled with
    ``seed`` before taking ``n`` so that a large instruct file gives a varied subset."""
    if n <= 0:
        raise CalibrationDataError(f"number of calibration samples must be positive, got {n}")
    if source is None or (isinstance(source, str) and source in SOURCES):
        convs = SOURCES[source or "synthetic"](n, seed)
        if not convs:
            raise CalibrationDataError(f"calibration source {source or 'synthetic'!r} produced no samples")
        return convs
    path = Path(source)
    folder = Path(image_folder) if image_folder is not None else None
    if path.is_dir():
        jsons = sorted([*path.glob("*.json"), *path.glob("*.jsonl")])
        if len(jsons) == 1:
            return _select_records(jsons[0], folder or path, n, seed)
        if len(jsons) > 1:
            raise CalibrationDataError(f"{path} holds several json/jsonl files; pass one of them")
        items = _folder_conversations(path)
        random.Random(seed).shuffle(items)
        return [
            Conversation(turns=[(prompt, "")], image=Image.open(img).convert("RGB"), source=str(img))
            for img, prompt in items[:n]
        ]
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return _select_records(path, _image_root_for(path, folder), n, seed)
    raise CalibrationDataError(
        f"calibration data {source!r} is neither a known source ({', '.join(SOURCES)}), "
        "a LLaVA-Instruct .json/.jsonl file, nor a folder"
    )


def _select_records(path: Path, image_root: Path, n: int, seed: int) -> list[Conversation]:
    records = read_llava_json(path)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order[:n]:
        conv = parse_llava_record(records[i], image_root, f"{path.name}[{i}]")
        if conv.turns:
            out.append(conv)
    if not out:
        raise CalibrationDataError(f"{path} yielded no usable conversation")
    return out


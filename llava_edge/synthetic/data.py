"""Deterministic synthetic visual QA: scenes of coloured shapes (and sometimes a digit) with captions
and question/answer conversations.

Why synthetic: no data set or model hub is reachable, and a person must be able to check every answer
against the picture. Every answer is computed from the scene description, never from pixels, so the
labels are exact; every sample is a pure function of ``(seed, index)``, so a split is reproducible on
any machine and the held-out split (a different seed) never shares a random stream with training.

Layout: a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` white canvas divided into a 3x3 grid of cells. 1-4 shapes
occupy distinct cells (jittered inside the cell) and, in ~60% of scenes, a black digit occupies one
more cell. The grid makes positions ("top left") and relations ("left of") unambiguous, while the
jitter and two sizes keep the pixels varied. No two shapes share both colour and kind, so "the red
circle" always names exactly one object.

Answers are one or two lower-case words so exact match is meaningful.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 72
GRID = 3
CELL = IMAGE_SIZE // GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (150, 40, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
RADIUS = {"small": 5, "big": 9}
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
DIGITS = tuple(str(d) for d in range(10))
MAX_SHAPES = 4
DIGIT_PROB = 0.6

#: The seed of the held-out split. Training refuses it (see ``train.py``).
HELDOUT_SEED = 1_000_003
TRAIN_SEED = 0

QUESTION_TYPES = (
    "count",  # how many shapes are there?
    "count_color",  # how many red shapes are there?
    "color",  # what color is the circle?
    "shape",  # what shape is the red one?
    "exists",  # is there a green triangle?
    "size",  # is the red circle big or small?
    "position",  # where is the red circle?
    "relation",  # what shape is left of the red circle? (two-step reasoning)
    "text",  # what number is written in the image?
)


def position_name(row: int, col: int) -> str:
    """Grid cell -> words. The centre cell is "center"; edge-middle cells use one word ("top", "left")."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COL_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


ALL_POSITIONS = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))

#: Every answer a question type can have; 1/len is the uniform chance level.
ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    "count": tuple(str(i) for i in range(1, MAX_SHAPES + 1)),
    "count_color": tuple(str(i) for i in range(0, MAX_SHAPES + 1)),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "exists": ("yes", "no"),
    "size": SIZES,
    "position": ALL_POSITIONS,
    "relation": tuple(COLORS) + SHAPES,
    "text": DIGITS,
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    row: int
    col: int
    cx: int  # centre in pixels
    cy: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Digit:
    value: str
    row: int
    col: int
    cx: int
    cy: int


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    digit: Digit | None = None


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    qtype: str


@dataclass
class Sample:
    """One generated example: the picture, its description and one question per applicable type."""

    image: Image.Image
    scene: Scene
    caption: str
    turns: list[Turn] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Scenes and rendering


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 1-4 shapes in distinct cells with distinct (colour, kind), maybe a digit."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = rng.permutation(GRID * GRID)
    combos = [(c, k) for c in COLORS for k in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    shapes = []
    for i in range(n):
        color, kind = combos[int(picks[i])]
        size = SIZES[int(rng.integers(2))]
        row, col = divmod(int(cells[i]), GRID)
        jit = CELL // 2 - RADIUS[size] - 1
        cx = col * CELL + CELL // 2 + int(rng.integers(-jit, jit + 1))
        cy = row * CELL + CELL // 2 + int(rng.integers(-jit, jit + 1))
        shapes.append(Shape(kind, color, size, row, col, cx, cy))
    digit = None
    if rng.random() < DIGIT_PROB:
        row, col = divmod(int(cells[n]), GRID)
        value = DIGITS[int(rng.integers(10))]
        digit = Digit(value, row, col, col * CELL + CELL // 2 + int(rng.integers(-3, 4)),
                      row * CELL + CELL // 2 + int(rng.integers(-3, 4)))
    return Scene(tuple(shapes), digit)


_FONT: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's embedded default font: available offline, identical on every machine.
    global _FONT
    if _FONT is None:
        try:
            _FONT = ImageFont.load_default(size=16)
        except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
            _FONT = ImageFont.load_default()
    return _FONT


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill: int | tuple[int, int, int]) -> None:
    r = RADIUS[s.size]
    if s.kind == "circle":
        draw.ellipse([s.cx - r, s.cy - r, s.cx + r, s.cy + r], fill=fill)
    elif s.kind == "square":
        q = int(round(r * 0.85))
        draw.rectangle([s.cx - q, s.cy - q, s.cx + q, s.cy + q], fill=fill)
    else:
        draw.polygon([(s.cx, s.cy - r), (s.cx - r, s.cy + r - 1), (s.cx + r, s.cy + r - 1)], fill=fill)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Draw the scene. Returns the RGB image and an object-id mask (0 = background, i+1 = shape i,
    ``len(shapes)+1`` = the digit) that the vision pre-training uses for per-patch labels."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    # No anti-aliasing: an anti-aliased digit in the id mask would blend into other objects' ids.
    d.fontmode = dm.fontmode = "1"
    for i, s in enumerate(scene.shapes):
        _draw_shape(d, s, COLORS[s.color])
        _draw_shape(dm, s, i + 1)
    if scene.digit is not None:
        g = scene.digit
        d.text((g.cx, g.cy), g.value, fill=(0, 0, 0), font=_font(), anchor="mm")
        dm.text((g.cx, g.cy), g.value, fill=len(scene.shapes) + 1, font=_font(), anchor="mm")
    return img, np.asarray(mask)


# ---------------------------------------------------------------------------------------------
# Language


def caption(scene: Scene) -> str:
    """Stage-1 caption: every object with its size, colour, kind and position, in reading order."""
    objs = sorted(scene.shapes, key=lambda s: (s.row, s.col))
    n = len(objs)
    parts = [f"a {s.size} {s.color} {s.kind} at {position_name(s.row, s.col)}" for s in objs]
    text = f"there {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'} . " + " , ".join(parts) + " ."
    if scene.digit is not None:
        text += f" the number {scene.digit.value} is at {position_name(scene.digit.row, scene.digit.col)} ."
    return text


_DIRS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def neighbour(scene: Scene, ref: Shape, direction: str) -> Shape | None:
    """The nearest shape in the same row (left/right of) or column (above/below) as ``ref``."""
    dr, dc = _DIRS[direction]
    best, best_dist = None, 99
    for s in scene.shapes:
        if s is ref:
            continue
        if dr == 0 and s.row == ref.row and (s.col - ref.col) * dc > 0:
            dist = abs(s.col - ref.col)
        elif dc == 0 and s.col == ref.col and (s.row - ref.row) * dr > 0:
            dist = abs(s.row - ref.row)
        else:
            continue
        if dist < best_dist:
            best, best_dist = s, dist
    return best


def questions(scene: Scene, rng: np.random.Generator) -> list[Turn]:
    """One question per applicable type, in random order. Types that need something the scene lacks
    (a unique kind, a neighbour, a digit) are skipped for that scene."""
    shapes = scene.shapes
    colors = list(COLORS)
    turns: list[Turn] = []

    def pick(seq):  # rng.choice on a list of objects, deterministic
        return seq[int(rng.integers(len(seq)))]

    turns.append(Turn("how many shapes are there?", str(len(shapes)), "count"))

    present = sorted({s.color for s in shapes}, key=colors.index)
    c = pick(present) if rng.random() < 0.7 else pick(colors)
    turns.append(Turn(f"how many {c} shapes are there?", str(sum(s.color == c for s in shapes)), "count_color"))

    kinds = Counter(s.kind for s in shapes)
    unique_kinds = [k for k in SHAPES if kinds[k] == 1]
    if unique_kinds:
        k = pick(unique_kinds)
        s = next(s for s in shapes if s.kind == k)
        turns.append(Turn(f"what color is the {k}?", s.color, "color"))

    cols = Counter(s.color for s in shapes)
    unique_cols = [c for c in colors if cols[c] == 1]
    if unique_cols:
        c = pick(unique_cols)
        s = next(s for s in shapes if s.color == c)
        turns.append(Turn(f"what shape is the {c} one?", s.kind, "shape"))

    if rng.random() < 0.5:
        s = pick(list(shapes))
        turns.append(Turn(f"is there a {s.color} {s.kind}?", "yes", "exists"))
    else:
        names = {s.name for s in shapes}
        absent = [f"{c} {k}" for c in colors for k in SHAPES if f"{c} {k}" not in names]
        turns.append(Turn(f"is there a {pick(absent)}?", "no", "exists"))

    s = pick(list(shapes))
    turns.append(Turn(f"is the {s.name} big or small?", s.size, "size"))
    s = pick(list(shapes))
    turns.append(Turn(f"where is the {s.name}?", position_name(s.row, s.col), "position"))

    rels = [(r, d, t) for r in shapes for d in _DIRS if (t := neighbour(scene, r, d)) is not None]
    if rels:
        ref, direction, target = pick(rels)
        if rng.random() < 0.5:
            turns.append(Turn(f"what shape is {direction} the {ref.name}?", target.kind, "relation"))
        else:
            turns.append(Turn(f"what color is the shape {direction} the {ref.name}?", target.color, "relation"))

    if scene.digit is not None:
        turns.append(Turn("what number is written in the image?", scene.digit.value, "text"))

    order = rng.permutation(len(turns))
    return [turns[int(i)] for i in order]


#: What a question ends with when its answer is asked for as JSON (``as_json``).
JSON_SUFFIX = " answer in json."


def as_json(turn: Turn) -> Turn:
    """The same question asked for a JSON answer: ``{"answer": "red"}`` (json.dumps's separators, the
    compact form the runtime's schema-constrained decoding writes). The answer is the same string, so
    exact match on the parsed ``answer`` field is the same test as on the plain answer."""
    return Turn(turn.question + JSON_SUFFIX, json.dumps({"answer": turn.answer}), turn.qtype)


def generate_sample(seed: int, index: int) -> Sample:
    """Sample ``index`` of split ``seed``: a pure function of both (numpy's seed-sequence mixing)."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    image, _ = render(scene)
    return Sample(image=image, scene=scene, caption=caption(scene), turns=questions(scene, rng))


def generate_turns(seed: int, index: int) -> list[Turn]:
    """The questions of sample ``index`` of split ``seed`` without drawing its picture (rendering takes no
    randomness, so these are ``generate_sample(seed, index).turns``): for text-only statistics."""
    rng = np.random.default_rng([seed, index])
    return questions(random_scene(rng), rng)


def generate(seed: int, n: int, start: int = 0) -> Iterator[Sample]:
    for i in range(start, start + n):
        yield generate_sample(seed, i)


def vocabulary_text() -> str:
    """Every word the generator can emit, for building the tokenizer's vocabulary."""
    words = set()
    for s in [*ANSWER_SPACE.values()]:
        for a in s:
            words.update(a.split())
    return " ".join(sorted(words))


def chance_levels(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per question type: ``uniform`` = 1/|answer space|, ``majority`` = share of the most common
    answer among these samples (what a blind answerer that knows the answer distribution scores)."""
    answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    for s in samples:
        for t in s.turns:
            answers[t.qtype][t.answer] += 1
    out = {}
    for t, cnt in answers.items():
        total = sum(cnt.values())
        out[t] = {
            "uniform": 1.0 / len(ANSWER_SPACE[t]),
            "majority": (max(cnt.values()) / total) if total else float("nan"),
        }
    return out

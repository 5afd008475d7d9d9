"""The generator: deterministic per (seed, index), and its answers are right on hand-built scenes."""

from __future__ import annotations

import numpy as np
import pytest

from llava_edge.synthetic import data as D


def _turns(scene: D.Scene, seed: int = 0) -> dict[str, D.Turn]:
    return {t.qtype: t for t in D.questions(scene, np.random.default_rng(seed))}


def test_same_seed_same_samples() -> None:
    for i in range(5):
        a, b = D.generate_sample(0, i), D.generate_sample(0, i)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.caption == b.caption and a.turns == b.turns and a.scene == b.scene


def test_generate_turns_are_the_samples_turns() -> None:
    """The blind baseline reads questions without pictures: the same questions as the full samples."""
    for seed in (D.TRAIN_SEED, D.HELDOUT_SEED):
        for i in range(200):
            assert D.generate_turns(seed, i) == D.generate_sample(seed, i).turns, (seed, i)


def test_different_seeds_differ() -> None:
    a = [D.generate_sample(D.TRAIN_SEED, i) for i in range(5)]
    b = [D.generate_sample(D.HELDOUT_SEED, i) for i in range(5)]
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, b))
    assert [x.caption for x in a] != [y.caption for y in b]
    # and consecutive indices of one split differ too
    assert a[0].image.tobytes() != a[1].image.tobytes()


def test_image_format() -> None:
    s = D.generate_sample(0, 0)
    assert s.image.mode == "RGB" and s.image.size == (D.IMAGE_SIZE, D.IMAGE_SIZE)


def _scene() -> D.Scene:
    # red circle top-left, blue square top-right, green triangle bottom-right (big), digit 7 at centre
    return D.Scene(
        shapes=(
            D.Shape("circle", "red", "small", 0, 0, 12, 12),
            D.Shape("square", "blue", "small", 0, 2, 60, 12),
            D.Shape("triangle", "green", "big", 2, 2, 60, 60),
        ),
        digit=D.Digit("7", 1, 1, 36, 36),
    )


def test_rendered_pixels_match_scene() -> None:
    scene = _scene()
    img, mask = D.render(scene)
    arr = np.asarray(img)
    for s in scene.shapes:  # the shape's colour is at its centre, in its cell
        assert tuple(arr[s.cy + 2, s.cx]) == D.COLORS[s.color], s
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4}  # background, 3 shapes, the digit
    assert (arr[mask == 4] < 100).all()  # the digit is drawn in black
    assert (arr[mask == 0] == 255).all()  # nothing else on the canvas


@pytest.mark.parametrize("seed", range(20))
def test_answers_of_constructed_scene(seed: int) -> None:
    turns = _turns(_scene(), seed)
    assert turns["count"].answer == "3"
    assert turns["text"].answer == "7"
    cc = turns["count_color"]
    color = cc.question.split()[2]
    assert cc.answer == str(int(color in ("red", "blue", "green")))
    expected_color = {"circle": "red", "square": "blue", "triangle": "green"}
    kind = turns["color"].question.rstrip("?").split()[-1]
    assert turns["color"].answer == expected_color[kind]
    expected_pos = {"red circle": "top left", "blue square": "top right", "green triangle": "bottom right"}
    q = turns["position"].question
    name = q[len("where is the "):-1]
    assert turns["position"].answer == expected_pos[name]
    ex = turns["exists"]
    assert ex.answer == ("yes" if ex.question[len("is there a "):-1] in expected_pos else "no")
    sz = turns["size"]
    assert sz.answer == ("big" if "green triangle" in sz.question else "small")
    rel = turns["relation"]
    valid = {  # the only neighbours: circle <-> square in row 0, square <-> triangle in column 2
        "left of the blue square": ("circle", "red"),
        "right of the red circle": ("square", "blue"),
        "below the blue square": ("triangle", "green"),
        "above the green triangle": ("square", "blue"),
    }
    key = next(k for k in valid if rel.question.endswith(k + "?"))
    assert rel.answer == (valid[key][0] if rel.question.startswith("what shape") else valid[key][1])


def test_nearest_neighbour_in_row() -> None:
    far = D.Shape("circle", "red", "small", 0, 0, 12, 12)
    near = D.Shape("square", "green", "small", 0, 1, 36, 12)
    ref = D.Shape("triangle", "blue", "small", 0, 2, 60, 12)
    other_row = D.Shape("circle", "yellow", "small", 1, 1, 36, 36)
    scene = D.Scene((far, near, ref, other_row))
    assert D.neighbour(scene, ref, "left of") is near
    assert D.neighbour(scene, far, "right of") is near
    assert D.neighbour(scene, near, "below") is other_row
    assert D.neighbour(scene, ref, "right of") is None


def test_ambiguous_questions_are_not_asked() -> None:
    # two circles: "what color is the circle?" would be ambiguous and must not be asked
    scene = D.Scene((D.Shape("circle", "red", "small", 0, 0, 12, 12), D.Shape("circle", "blue", "big", 2, 2, 60, 60)))
    for seed in range(20):
        turns = _turns(scene, seed)
        assert "circle" not in turns.get("color", D.Turn("", "", "")).question
        assert "relation" not in turns and "text" not in turns


def test_generated_answers_consistent_with_scene() -> None:
    for i in range(200):
        s = D.generate_sample(3, i)
        assert 1 <= len(s.scene.shapes) <= D.MAX_SHAPES
        cells = [(x.row, x.col) for x in s.scene.shapes]
        if s.scene.digit is not None:
            cells.append((s.scene.digit.row, s.scene.digit.col))
        assert len(set(cells)) == len(cells)  # one object per cell
        assert len({x.name for x in s.scene.shapes}) == len(s.scene.shapes)  # names are unique
        for t in s.turns:
            assert t.answer in D.ANSWER_SPACE[t.qtype], t
            if t.qtype == "count":
                assert t.answer == str(len(s.scene.shapes))
        assert f"there {'is' if len(s.scene.shapes) == 1 else 'are'} {len(s.scene.shapes)} shape" in s.caption


def test_chance_levels() -> None:
    samples = list(D.generate(D.HELDOUT_SEED, 100))
    ch = D.chance_levels(samples)
    assert ch["exists"]["uniform"] == 0.5 and ch["position"]["uniform"] == pytest.approx(1 / 9)
    for t in D.QUESTION_TYPES:
        assert 0 < ch[t]["majority"] <= 1

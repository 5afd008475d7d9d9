import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from llava_edge.quantize.capture import encode_conversation
from llava_edge.quantize.data import CalibrationDataError, Conversation, load_calibration, shapes_sample


def _img(path, colour):
    Image.new("RGB", (40, 30), colour).save(path)


def test_llava_instruct_json_and_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    _img(tmp_path / "images" / "a.png", (255, 0, 0))
    _img(tmp_path / "images" / "b.png", (0, 0, 255))
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "2", "image": "b.png", "conversations": [{"from": "human", "value": "What is it?\n<image>"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Text only."}, {"from": "gpt", "value": "Ok."}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("data.json", "data.jsonl"):
        convs = load_calibration(str(tmp_path / name), 10, seed=0)
        by_turn = {c.turns[0][0]: c for c in convs}
        assert set(by_turn) == {"What colour?", "What is it?", "Text only."}
        assert by_turn["What colour?"].turns == [("What colour?", "Red."), ("Sure?", "Yes.")]
        assert by_turn["What colour?"].image.getpixel((0, 0)) == (255, 0, 0)
        assert by_turn["What is it?"].turns == [("What is it?", "")]
        assert by_turn["Text only."].image is None
    assert len(load_calibration(str(tmp_path / "data.json"), 2, seed=0)) == 2


def test_missing_image_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"image": "nope.png",
                                                  "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(CalibrationDataError, match="nope.png"):
        load_calibration(str(tmp_path / "d.json"), 1)


def test_folder_of_images_with_prompts(tmp_path):
    _img(tmp_path / "x.png", (1, 2, 3))
    _img(tmp_path / "y.jpg", (9, 9, 9))
    (tmp_path / "x.txt").write_text("Describe x.")
    (tmp_path / "prompts.txt").write_text("Shared prompt?\n")
    convs = {c.turns[0][0]: c for c in load_calibration(str(tmp_path), 5)}
    assert set(convs) == {"Describe x.", "Shared prompt?"}
    with pytest.raises(CalibrationDataError):
        load_calibration(str(tmp_path / "missing"), 1)


def test_builtin_source_is_deterministic_and_varied():
    a, b = shapes_sample(0, 3), shapes_sample(0, 3)
    assert a.turns == b.turns and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(shapes_sample(0, 4).image))
    convs = load_calibration(None, 4, seed=1)
    assert len(convs) == 4 and all(c.image is not None and c.turns for c in convs)


def test_calibration_prompt_matches_the_runtime_encoding(fp_package):
    from llava_edge.runtime.pipeline import Pipeline, Request

    pkg, _ = fp_package
    pipe = Pipeline.from_package(pkg)
    img = shapes_sample(0, 0).image
    ids = encode_conversation(Conversation([("What is shown?", "")], img), pipe.tokenizer, pipe.manifest.text,
                              pipe.manifest.vision.num_image_tokens)
    assert np.array_equal(ids, pipe.encode_request(Request(images=[img], turns=[("What is shown?", None)])))
    with_answer = encode_conversation(Conversation([("What is shown?", "A circle.")], img), pipe.tokenizer,
                                      pipe.manifest.text, pipe.manifest.vision.num_image_tokens)
    assert np.array_equal(with_answer[: len(ids)], ids) and len(with_answer) > len(ids)
    assert int((with_answer == pipe.manifest.text.image_token_id).sum()) == pipe.manifest.vision.num_image_tokens
    assert isinstance(pipe.tokenizer, Tokenizer)

"""Training runs end to end on a tiny budget, is reproducible, and writes a loadable llava-hf checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_edge.synthetic import data as D
from llava_edge.synthetic import train as T

EXPECTED_FILES = {
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json", "processor_config.json", "generation_config.json", "training_info.json",
}


def _tiny_cfg(seed: int = 0) -> T.TrainConfig:
    mc = T.ModelConfig(vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                       text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_mlp=64)
    st = lambda: T.StageConfig(steps=2, batch=3, lr=1e-3, warmup=1)  # noqa: E731
    return T.TrainConfig(seed=seed, threads=1, model=mc, vision=st(), language=st(), stage1=st(), stage2=st(),
                         stage2b=st())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    return out, T.train(out, _tiny_cfg())


def test_writes_llava_hf_layout(tiny_run: tuple[Path, dict]) -> None:
    out, info = tiny_run
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["projector_hidden_act"] == "gelu"
    from transformers import LlavaConfig

    # transformers serializes it as "image_token_index"; image_token_id is the attribute alias
    assert LlavaConfig.from_pretrained(out).image_token_id == T.SPECIAL_TOKENS.index(T.IMAGE)
    pp = json.loads((out / "preprocessor_config.json").read_text())
    assert pp["crop_size"] == {"height": D.IMAGE_SIZE, "width": D.IMAGE_SIZE}
    assert pp["image_mean"] == T.IMAGE_MEAN and pp["image_std"] == T.IMAGE_STD
    for stage in ("vision", "language", "stage1", "stage2", "stage2b"):
        assert info["log"][stage]["steps_done"] == 2
        assert np.isfinite(info["log"][stage]["final_loss_ema"])


def test_checkpoint_loads_and_generates(tiny_run: tuple[Path, dict]) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    out, _ = tiny_run
    proc = LlavaProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    s = D.generate_sample(D.HELDOUT_SEED, 0)
    inputs = proc(images=s.image, text=T.user_prompt(s.turns[0].question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == T.ModelConfig().num_patches
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_training_is_reproducible(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, _ = tiny_run
    T.train(tmp_path / "again", _tiny_cfg())
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_heldout_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="held-out"):
        T.train(tmp_path / "x", _tiny_cfg(seed=D.HELDOUT_SEED))


@pytest.fixture(scope="module")
def bpe() -> object:
    return T.build_tokenizer(n_samples=300)


def test_conversation_labels_cover_answers_only(bpe) -> None:
    tok = bpe
    js = D.as_json(D.Turn("what color is the circle?", "red", "color"))
    ids, labels = T.encode_conversation(tok, [("how many shapes are there?", "3"),
                                              ("where is the red circle?", "top left"), (js.question, js.answer)], 81)
    assert ids.count(tok.token_to_id(T.IMAGE)) == 81
    supervised = [tok.id_to_token(t) for t in labels if t != -100]
    # answers start right after "ASSISTANT:" (no space token), so a JSON answer starts with '{' exactly
    assert supervised == ["3", T.EOS, "top", "\u0120left", T.EOS, '{"', "answer", '":', '\u0120"', "red", '"}', T.EOS]
    assert len(ids) == len(labels) and ids[0] == tok.token_to_id(T.BOS)


def test_tokenizer_is_byte_level_with_every_word_one_token(bpe) -> None:
    tok = bpe
    words = D.vocabulary_text().split()
    for text in [*words, *(" " + w for w in words), "what", "how", "describe", " is", " there", " json"]:
        assert len(tok.encode(text, add_special_tokens=False).ids) == 1, text
    # any text has a spelling (structured answers need '{', '"', digits, non-ASCII) and decodes back
    text = '{"answer": "Zürich 42 \u2713", "n": [1, 2]}'
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text.lower()
    assert tok.encode("USER: <image>\nhi", add_special_tokens=False).tokens[3] == T.IMAGE  # special, unsplit


def test_tokenizer_drives_schema_constrained_decoding(bpe) -> None:
    """llguidance reads this tokenizer (the word-level one it replaces was refused): under a schema the
    first token can only be '{"', and the compact separators the training answers use are allowed."""
    pytest.importorskip("llguidance")
    from llava_edge.runtime.constrain import Grammar

    tok = bpe
    g = Grammar(tok, frozenset({tok.token_to_id(T.EOS)}),
                {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    m = g.matcher()
    for t in tok.encode(D.as_json(D.Turn("q", "top left", "position")).answer, add_special_tokens=False).ids:
        logits = np.zeros((1, tok.get_vocab_size()), np.float32)
        m.mask(logits)
        assert np.isfinite(logits[0, t]) and np.isinf(logits).sum() > 0, tok.id_to_token(t)
        m.advance(t)
    assert m.accepting


def test_json_turns_ask_for_json_and_keep_the_answer() -> None:
    rng = np.random.default_rng(1)
    s = next(D.generate(D.TRAIN_SEED, 1, 123))
    turns = T.sample_turns(s, rng, describe_prob=0.0, weights=T.TURN_WEIGHTS, json_prob=1.0)
    plain = {t.question: t for t in s.turns}
    for q, a in turns:
        assert q.endswith(D.JSON_SUFFIX)
        base = q[: -len(D.JSON_SUFFIX)]
        if plain[base].qtype not in ("count_color", "exists"):  # those two are redrawn balanced
            assert json.loads(a) == {"answer": plain[base].answer}
        assert list(json.loads(a)) == ["answer"] and a == json.dumps(json.loads(a))


def test_transplant_keeps_rows_of_known_words(bpe) -> None:
    """A checkpoint of a word-level vocabulary moves to the byte-level one: a word's rows (input and
    output) go to its new tokens with and without the leading-space mark; new pieces get the mean row."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = T.SPECIAL_TOKENS + ["red", "circle", "?", "what"]
    old = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=T.UNK))
    old.normalizer = normalizers.Lowercase()
    old.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    mc = _tiny_cfg().model
    model = T.build_model(mc, len(words))
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    moved = T.transplant_vocabulary(model, old, bpe)
    n = bpe.get_vocab_size()
    new_emb, new_head = model.get_input_embeddings().weight, model.lm_head.weight
    assert new_emb.shape[0] == new_head.shape[0] == model.config.text_config.vocab_size == n
    for word, j in (("red", 5), ("circle", 6), ("?", 7)):
        for piece in (word, "\u0120" + word):
            i = bpe.token_to_id(piece)
            if i is None:
                continue
            assert torch.equal(new_emb[i], emb[j]) and torch.equal(new_head[i], head[j]), piece
    assert torch.equal(new_emb[bpe.token_to_id(T.IMAGE)], emb[4])
    fresh = bpe.token_to_id('{"')
    assert torch.allclose(new_emb[fresh], emb.mean(0)) and torch.allclose(new_head[fresh], head.mean(0))
    assert len(words) <= moved < n
    out = model(input_ids=torch.tensor([bpe.encode("what color is the red circle?").ids]))
    assert out.logits.shape[-1] == n


def _scenes(n: int = 400) -> list[D.Sample]:
    return list(D.generate(D.TRAIN_SEED, n, 50_000))


def test_balanced_count_color_is_correct_and_uniform_over_available_counts() -> None:
    rng = np.random.default_rng(0)
    answers = []
    for s in _scenes():
        t = T.balanced_count_color(s.scene, rng)
        color = t.question.split()[2]
        assert t.qtype == "count_color" and color in D.COLORS
        assert t.answer == str(sum(x.color == color for x in s.scene.shapes))
        answers.append(t.answer)
    share = {a: answers.count(a) / len(answers) for a in set(answers)}
    # the generator's own mix answers "1" about 68% of the time; balanced, no answer dominates
    assert share["1"] < 0.5 and share["0"] > 0.3 and share.get("2", 0) > 0.1


def test_hard_exists_answers_are_right_and_negatives_are_near_misses() -> None:
    rng = np.random.default_rng(1)
    yes = near = no = 0
    for s in _scenes():
        t = T.hard_exists(s.scene, rng)
        color, kind = t.question.removeprefix("is there a ").removesuffix("?").split()
        present = any(x.color == color and x.kind == kind for x in s.scene.shapes)
        assert t.answer == ("yes" if present else "no")
        yes += present
        if not present:
            no += 1
            near += any(x.color == color or x.kind == kind for x in s.scene.shapes)
    assert 0.4 < yes / (yes + no) < 0.6
    assert near / no > 0.7  # mostly share a colour or a kind with a shape that is there


def test_weighted_turns_follow_the_weights() -> None:
    tok_counts = {"count": 0, "count_color": 0}
    rng = np.random.default_rng(2)
    weights = {t: 1.0 for t in D.QUESTION_TYPES} | {"count": 0.25, "count_color": 4.0}
    for s in _scenes(300):
        for q, _ in T.sample_turns(s, rng, describe_prob=0.0, weights=weights):
            if q == "how many shapes are there?":
                tok_counts["count"] += 1
            elif q.startswith("how many "):
                tok_counts["count_color"] += 1
    assert tok_counts["count_color"] > 3 * tok_counts["count"] > 0


def test_resume_runs_only_the_named_stages(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """The two-command recipe: a checkpoint trained through stage 2, then stage 2b resumed from it."""
    from safetensors.torch import load_file

    base, _ = tiny_run
    info = T.train(tmp_path / "b", _tiny_cfg(), stages=["stage2b"], resume=base)
    assert info["stages"] == ["stage2b"] and info["resumed_from"]["path"] == str(base)
    assert set(info["log"]) >= {"vision", "language", "stage1", "stage2", "stage2b"}  # earlier log kept
    a, b = load_file(base / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    tower = [k for k in a if "vision_tower" in k]
    lm = [k for k in a if "language_model" in k or k.startswith("lm_head")]
    assert tower and all(torch.equal(a[k], b[k]) for k in tower)  # frozen
    assert any(not torch.equal(a[k], b[k]) for k in lm)  # trained


def test_bad_stage_or_resume_is_a_usage_error(tmp_path: Path) -> None:
    from llava_edge.errors import UsageError

    with pytest.raises(UsageError, match="unknown stage"):
        T.train(tmp_path / "x", _tiny_cfg(), stages=["stage3"])
    with pytest.raises(UsageError, match="not a checkpoint"):
        T.train(tmp_path / "y", _tiny_cfg(), stages=["stage2b"], resume=tmp_path)


def test_lm_from_copies_the_language_model_and_leaves_vision_fresh(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """A variant with another vision tower (more image tokens) starts its LM from a trained checkpoint."""
    from safetensors.torch import load_file

    from llava_edge.errors import UsageError

    base, _ = tiny_run
    cfg = _tiny_cfg()
    cfg.model.patch_size = 36  # another tower: 4 image tokens instead of 81
    info = T.train(tmp_path / "v", cfg, stages=["vision"], lm_from=base)
    assert info["lm_from"]["path"] == str(base)
    a, b = load_file(base / "model.safetensors"), load_file(tmp_path / "v" / "model.safetensors")
    lm = [k for k in a if "language_model" in k or k.startswith("lm_head")]
    assert lm and all(torch.equal(a[k], b[k]) for k in lm)  # copied, and stage V does not touch it
    patch = next(k for k in a if k.endswith("patch_embedding.weight"))
    assert a[patch].shape != b[patch].shape  # the fresh tower has the new patch size
    other = _tiny_cfg()
    other.model.text_hidden = 64
    with pytest.raises(UsageError, match="other dims"):
        T.train(tmp_path / "w", other, stages=["vision"], lm_from=base)


def test_text_width_flags_set_the_language_model_dims(tmp_path: Path) -> None:
    """--text-hidden / --text-mlp make the wider model whose int4 blocks can be 256 wide (issue 26's block
    decision); a width GPTQ's group 128 cannot split is one usage error, before anything trains."""
    from llava_edge.errors import UsageError

    with pytest.raises(UsageError, match="--text-mlp 320: must be a positive multiple of 128"):
        T.main(["--out", str(tmp_path / "x"), "--text-mlp", "320"])
    assert not (tmp_path / "x").exists()
    cfg = T.config_from_args(T.parser().parse_args(["--out", "x", "--text-hidden", "256", "--text-mlp", "768"]))
    text = T.build_model(cfg.model, vocab_size=64).config.text_config
    assert (text.hidden_size, text.intermediate_size) == (256, 768)
    assert T.config_from_args(T.parser().parse_args(["--out", "x"])).model == T.ModelConfig()

"""Train a tiny LLaVA on the synthetic scenes, on CPU, in minutes, and save it as a llava-hf checkpoint.

Recipe (LLaVA's two stages, preceded by the two pre-trainings a real LLaVA inherits from CLIP and
Vicuna, because nothing pre-trained is reachable here):

* stage V, vision pre-training: a small CLIP-architecture ViT learns with *auxiliary attribute heads*
  (per patch, read from layer -2, the layer LLaVA uses: colour, kind, size, grid cell and digit of
  the object under it, its nearest neighbour's colour and kind in each direction, and the scene's
  shape count and count per colour; the counts also from the pooled CLS so the last layer trains).
  Why not CLIP-style contrastive: with the small batches 2 CPU cores afford, a contrastive loss gives
  a weak, slow signal and needs a text tower; dense labels make *every patch feature* carry what the
  projector must pass on, which is exactly what LLaVA consumes (patch tokens, CLS dropped).
* stage L, language pre-training: the LLaMA decoder learns the vocabulary and grammar from text only
  (captions and Q/A transcripts without images), standing in for Vicuna.
* stage 1 (paper): vision tower and LM frozen, only the projector trains on image-caption pairs.
* stage 2 (paper): vision tower frozen, projector + LM train on multi-turn instruction conversations,
  loss on answer tokens only.
* stage 2b: stage 2 continued with a mix concentrated on the question types that need the LM to pick
  one thing out of the image by what the question names (``FOCUS_WEIGHTS``). Not in the paper; added
  because stage 2 alone left count_color and exists at chance (see docs/synthetic.md).

Everything is seeded (torch + the generator's ``(seed, index)`` streams) and step-counted, so a run is
reproducible; ``--minutes-budget`` is only a safety cap (a run that hits it says so in
``training_info.json``).

    python -m llava_edge.synthetic.train --out DIR --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llava_edge.errors import UsageError
from llava_edge.synthetic import data as D

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE]  # ids 0..4 in this order
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP statistics, as a real LLaVA uses
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
DESCRIBE = "describe the image."


def user_prompt(question: str) -> str:
    """The first user turn in llava-1.5 / llava-hf format (the runtime uses exactly this)."""
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


@dataclass
class ModelConfig:
    """Dims of the tiny LLaVA. LM widths are multiples of 128 so GPTQ's group size 128 applies."""

    image_size: int = D.IMAGE_SIZE
    patch_size: int = 12  # 6x6 = 36 image tokens: each grid cell is 2x2 patches; 2x cheaper LM steps than patch 8
    vision_hidden: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention
    text_mlp: int = 384
    max_positions: int = 256

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 30


#: Relative weight of each question type when stage 2 draws a conversation's turns. The first two
#: shipped runs left ``exists`` and ``count_color`` at chance and ``shape`` weak while count, text and
#: size were solved: a linear probe on the frozen tower's patch features read the per-colour counts at
#: 98.6% from any single patch, so the missing skill was the LM's (route the question's colour to the
#: right count), and it gets more of the turns; solved types fewer. Uniform = the generator's own mix.
TURN_WEIGHTS: dict[str, float] = {
    "count": 0.5, "text": 0.5, "size": 0.75, "color": 1.0, "position": 1.0, "relation": 1.0,
    "shape": 1.5, "exists": 2.0, "count_color": 2.0,
}

#: Stage 2b's mix: the same conversations, concentrated on the types that need the LM to pick one
#: thing out of the image by what the question names (count_color, exists, shape), the rest kept in
#: so they are not forgotten. Measured (docs/synthetic.md): after stage 2 alone, with TURN_WEIGHTS,
#: count_color and exists were still at chance; 1,500 focused steps took them to ~96% and ~78% with the
#: loss dropping abruptly a few hundred steps in (a plateau, then a jump), others unchanged or better.
FOCUS_WEIGHTS: dict[str, float] = {
    "count": 0.25, "text": 0.25, "size": 0.5, "color": 0.75, "position": 0.75, "relation": 0.75,
    "shape": 1.5, "exists": 3.0, "count_color": 3.0,
}


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1  # measured: with the 2 cores shared, 2 OpenMP threads ran 2-10x slower than 1
    model: ModelConfig = field(default_factory=ModelConfig)
    # the shipped checkpoint's recipe (scale 1.0); tests scale it down
    vision: StageConfig = field(default_factory=lambda: StageConfig(steps=1280, batch=32, lr=2e-3))
    language: StageConfig = field(default_factory=lambda: StageConfig(steps=480, batch=32, lr=2e-3))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=480, batch=24, lr=2e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=6000, batch=24, lr=1.5e-3))
    stage2b: StageConfig = field(default_factory=lambda: StageConfig(steps=1500, batch=24, lr=1e-3))
    describe_prob: float = 0.1  # share of stage-2 conversations that start with "describe the image."
    json_prob: float = 0.2  # share of question turns asked for a JSON answer (data.as_json)
    vocab_size: int = 512  # byte-level BPE cap (the generator's text needs ~430: every word one token)
    # stage-2 question-type mix and balanced count_color / exists turns (None = the generator's mix)
    turn_weights: dict[str, float] | None = field(default_factory=lambda: dict(TURN_WEIGHTS))
    focus_weights: dict[str, float] = field(default_factory=lambda: dict(FOCUS_WEIGHTS))  # stage 2b
    minutes_budget: float | None = None

    def scaled(self, factor: float) -> "TrainConfig":
        """Same recipe with every stage's step count scaled (tests use a tiny factor)."""
        for st in (self.vision, self.language, self.stage1, self.stage2, self.stage2b):
            st.steps = max(1, int(round(st.steps * factor)))
            st.warmup = min(st.warmup, max(1, st.steps // 5))
        return self


# ---------------------------------------------------------------------------------------------
# Tokenizer and processor


def build_tokenizer(seed: int = D.TRAIN_SEED, n_samples: int = 2000, vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and byte alphabet) trained with `tokenizers` on
    generated text: captions, questions and answers, plain and as JSON.

    Byte-level because every byte string has a spelling, so structured answers work: llguidance maps each
    token to its bytes and can force ``{"answer": "`` while the model fills in the value. The vocabulary is
    large enough that every word the generator emits is one token (with and without its leading space, as
    the word starts a line or follows a quote), so answers stay 1-2 tokens. Lower-cased like the word-level
    tokenizer this replaces, so "What color" and "what color" are the same prompt. The post-processor
    prepends ``<s>`` so HF and a plain ``tokenizers.Tokenizer`` agree.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    words = D.vocabulary_text().split()
    corpus = [" ".join(words), "\n".join(words), user_prompt(DESCRIBE)]
    for s in D.generate(seed, n_samples):
        corpus.append(s.caption)
        for t in s.turns:
            for turn in (t, D.as_json(t)):
                # prompt and answer are encoded apart in training (encode_conversation), so apart here
                corpus += [user_prompt(turn.question), turn.answer, f"USER: {turn.question} ASSISTANT:"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


def transplant_vocabulary(model, old_tok, new_tok) -> int:
    """Resize ``model``'s embedding and head from ``old_tok``'s vocabulary to ``new_tok``'s, keeping what
    was learnt: a new token whose text (without the byte-level leading-space mark, lower-cased) is an old
    token gets that token's input and output rows; the rest start from the mean row, so the head gives
    them the average logit rather than an arbitrary one. Returns how many new tokens were transplanted.

    Why: the shipped checkpoint's skills (counting a named colour, telling a present shape from a near
    miss) took a plateau-then-jump stage 2b to get, and that jump did not reproduce from every starting
    point (docs/synthetic.md); continuing from its weights under the new tokenizer keeps them.
    """
    old_vocab = old_tok.get_vocab()
    emb = model.get_input_embeddings().weight.data
    head = model.lm_head.weight.data
    n = new_tok.get_vocab_size()
    new_emb = emb.mean(0, keepdim=True).repeat(n, 1)
    new_head = head.mean(0, keepdim=True).repeat(n, 1)
    moved = 0
    for piece, i in new_tok.get_vocab().items():
        j = old_vocab.get(piece, old_vocab.get(piece.replace("\u0120", " ").strip().lower()))
        if j is not None:
            new_emb[i], new_head[i] = emb[j], head[j]
            moved += 1
    model.resize_token_embeddings(n, mean_resizing=False)  # every row is set below
    model.get_input_embeddings().weight.data.copy_(new_emb)
    model.lm_head.weight.data.copy_(new_head)
    model.config.text_config.vocab_size = n
    return moved


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, clean_up_tokenization_spaces=False,
    )


def image_processor(cfg: ModelConfig):
    from transformers import CLIPImageProcessor

    s = cfg.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_resize=True, do_center_crop=True,
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD, resample=3, do_rescale=True, rescale_factor=1 / 255,
    )


def pixels(images: Iterable) -> torch.Tensor:
    """PIL images -> normalized [B,3,H,W], the same numbers CLIPImageProcessor gives (images are
    already at the tower's size, so its resize and crop are identities; a test checks this)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Model


def build_model(cfg: ModelConfig, vocab_size: int):
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads, max_position_embeddings=cfg.max_positions,
        bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD), tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIAL_TOKENS.index(IMAGE),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=cfg.num_patches,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        do_sample=False, max_new_tokens=8,
    )
    return model


NEIGHBOUR_DIRS = ("left of", "right of", "above", "below")


class VisionHeads(nn.Module):
    """Auxiliary heads for vision pre-training (discarded afterwards)."""

    N_COLOR = len(D.COLORS) + 2  # none, colours..., black (digit)
    N_KIND = len(D.SHAPES) + 2  # none, kinds..., digit

    def __init__(self, hidden: int):
        super().__init__()
        self.color = nn.Linear(hidden, self.N_COLOR)
        self.kind = nn.Linear(hidden, self.N_KIND)
        self.size = nn.Linear(hidden, len(D.SIZES))
        self.cell = nn.Linear(hidden, D.GRID * D.GRID)
        self.digit = nn.Linear(hidden, len(D.DIGITS))
        self.count = nn.Linear(hidden, D.MAX_SHAPES)
        self.color_count = nn.Linear(hidden, len(D.COLORS) * (D.MAX_SHAPES + 1))
        # the scene's inventory: is there a (colour, kind) shape, one bit per pair (multi-label)
        self.inventory = nn.Linear(hidden, len(D.COLORS) * len(D.SHAPES))
        # per object patch, the colour and kind of its nearest neighbour in each direction (0 = none)
        self.nb_color = nn.Linear(hidden, len(NEIGHBOUR_DIRS) * (len(D.COLORS) + 1))
        self.nb_kind = nn.Linear(hidden, len(NEIGHBOUR_DIRS) * (len(D.SHAPES) + 1))


def patch_labels(samples: list[D.Sample], patch: int) -> dict[str, torch.Tensor]:
    """Per-patch targets from the object mask; -100 where a head does not apply."""
    colors, kinds = list(D.COLORS), list(D.SHAPES)
    out: dict[str, list] = {k: [] for k in ("color", "kind", "size", "cell", "digit", "count", "color_count",
                                            "nb_color", "nb_kind", "inventory")}
    for s in samples:
        _, mask = D.render(s.scene)
        g = mask.shape[0] // patch
        blocks = mask.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        lab = {k: np.full(g * g, -100, np.int64) for k in ("color", "kind", "size", "cell", "digit")}
        nd = len(NEIGHBOUR_DIRS)
        lab["nb_color"] = np.full((g * g, nd), -100, np.int64)
        lab["nb_kind"] = np.full((g * g, nd), -100, np.int64)
        nbs = [[D.neighbour(s.scene, sh, d) for d in NEIGHBOUR_DIRS] for sh in s.scene.shapes]
        for p in range(g * g):
            ids, cnt = np.unique(blocks[p][blocks[p] > 0], return_counts=True)
            if len(ids) == 0 or cnt.max() < 3:
                lab["color"][p] = lab["kind"][p] = 0
                continue
            oid = int(ids[cnt.argmax()]) - 1
            if oid < len(s.scene.shapes):
                sh = s.scene.shapes[oid]
                lab["color"][p] = 1 + colors.index(sh.color)
                lab["kind"][p] = 1 + kinds.index(sh.kind)
                lab["size"][p] = D.SIZES.index(sh.size)
                lab["cell"][p] = sh.row * D.GRID + sh.col
                lab["nb_color"][p] = [0 if n is None else 1 + colors.index(n.color) for n in nbs[oid]]
                lab["nb_kind"][p] = [0 if n is None else 1 + kinds.index(n.kind) for n in nbs[oid]]
            else:
                dg = s.scene.digit
                lab["color"][p] = VisionHeads.N_COLOR - 1
                lab["kind"][p] = VisionHeads.N_KIND - 1
                lab["cell"][p] = dg.row * D.GRID + dg.col
                lab["digit"][p] = int(dg.value)
        for k, v in lab.items():
            out[k].append(v)
        out["count"].append(len(s.scene.shapes) - 1)
        out["color_count"].append([sum(x.color == c for x in s.scene.shapes) for c in colors])
        names = {x.name for x in s.scene.shapes}
        out["inventory"].append([float(f"{c} {k}" in names) for c in colors for k in kinds])
    return {k: torch.tensor(np.array(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Sequences


def encode_conversation(tok, turns: list[tuple[str, str]],
                        num_image_tokens: int | None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation in llava-1.5 format, ``<image>`` already expanded.

    ``USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``, labels = -100 except
    on answer tokens and their ``</s>`` (the model learns to answer, not to ask). ``num_image_tokens``
    None: a text-only transcript (stage L), every turn ``USER: {q} ASSISTANT: {a}</s>``.
    """
    eos = tok.token_to_id(EOS)
    ids = [tok.token_to_id(BOS)]
    labels = [-100]
    for i, (q, a) in enumerate(turns):
        if i == 0 and num_image_tokens is not None:
            prompt = user_prompt(q).replace(IMAGE, IMAGE * num_image_tokens)
        else:
            prompt = f"USER: {q} ASSISTANT:"
        p = tok.encode(prompt, add_special_tokens=False).ids
        # no leading space: the answer's first token is the one the runtime's prompt ("...ASSISTANT:") is
        # followed by, and a JSON answer must start with '{' exactly (schema-constrained decoding forces it)
        ans = tok.encode(a, add_special_tokens=False).ids + [eos]
        ids += p + ans
        labels += [-100] * len(p) + ans
    return ids, labels


def pad_batch(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    n = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), n), SPECIAL_TOKENS.index(PAD), dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, (i, lb) in enumerate(seqs):
        ids[r, : len(i)] = torch.tensor(i)
        lab[r, : len(lb)] = torch.tensor(lb)
        att[r, : len(i)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def balanced_count_color(scene: D.Scene, rng: np.random.Generator) -> D.Turn:
    """A "how many C shapes" turn whose answer is uniform over the counts this scene offers.

    The generator asks mostly about a present colour, so "1" is the answer 68% of the time and a model
    that always says "1" is at chance; here each available count (0, 1, 2, ...) is equally likely, then
    a colour with that count, so the answer can only be learned by looking.
    """
    counts = {c: sum(s.color == c for s in scene.shapes) for c in D.COLORS}
    values = sorted(set(counts.values()))
    v = values[int(rng.integers(len(values)))]
    options = [c for c in D.COLORS if counts[c] == v]
    c = options[int(rng.integers(len(options)))]
    return D.Turn(f"how many {c} shapes are there?", str(v), "count_color")


def hard_exists(scene: D.Scene, rng: np.random.Generator) -> D.Turn:
    """An "is there a C K?" turn, half yes; a "no" names, when it can, an absent pair that shares its
    colour or its kind with a shape in the scene, so colour or kind alone cannot answer it."""
    names = {s.name for s in scene.shapes}
    if rng.random() < 0.5:
        s = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return D.Turn(f"is there a {s.name}?", "yes", "exists")
    absent = [f"{c} {k}" for c in D.COLORS for k in D.SHAPES if f"{c} {k}" not in names]
    near = [a for a in absent if any(a.split()[0] == s.color or a.split()[1] == s.kind for s in scene.shapes)]
    pool = near if near and rng.random() < 0.8 else absent
    return D.Turn(f"is there a {pool[int(rng.integers(len(pool)))]}?", "no", "exists")


def sample_turns(s: D.Sample, rng: np.random.Generator, describe_prob: float,
                 weights: dict[str, float] | None = None, json_prob: float = 0.0) -> list[tuple[str, str]]:
    """A 1-3 turn conversation drawn from the sample's questions (sometimes opening with a caption).

    With ``weights`` (stage 2), turns are drawn without replacement in proportion to their type's
    weight, and the count_color / exists turns are replaced by their balanced versions above. Each
    question turn is asked for a JSON answer with probability ``json_prob``.
    """
    k = int(rng.integers(1, 4))
    pool = list(s.turns)
    if weights is None:
        idx = rng.permutation(len(pool))[:k]
    else:
        pool = [balanced_count_color(s.scene, rng) if t.qtype == "count_color"
                else hard_exists(s.scene, rng) if t.qtype == "exists" else t for t in pool]
        w = np.array([weights.get(t.qtype, 1.0) for t in pool], dtype=np.float64)
        idx = rng.choice(len(pool), size=min(k, len(pool)), replace=False, p=w / w.sum())
    picked = [pool[int(i)] for i in idx]
    if json_prob > 0:
        picked = [D.as_json(t) if rng.random() < json_prob else t for t in picked]
    turns = [(t.question, t.answer) for t in picked]
    if rng.random() < describe_prob:
        turns = [(DESCRIBE, s.caption)] + turns[:1]
    return turns


# ---------------------------------------------------------------------------------------------
# Loops


def _schedule(st: StageConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < st.warmup:
            return (step + 1) / st.warmup
        t = (step - st.warmup) / max(1, st.steps - st.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _loop(name: str, st: StageConfig, params: list[nn.Parameter], step_fn: Callable[[int], torch.Tensor],
          deadline: float | None, log: dict) -> None:
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(st))
    t0, ema, done = time.time(), None, 0
    for step in range(st.steps):
        if deadline is not None and time.time() > deadline:
            print(f"[{name}] minutes budget reached: stopped at step {step}/{st.steps}", flush=True)
            break
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        done = step + 1
        if step % 100 == 0 or step == st.steps - 1:
            print(f"[{name}] step {step:5d}/{st.steps} loss {ema:.4f} ({time.time() - t0:.0f}s)", flush=True)
    log[name] = {"steps_planned": st.steps, "steps_done": done, "final_loss_ema": ema,
                 "seconds": round(time.time() - t0, 1), "batch": st.batch, "lr": st.lr,
                 "threads": torch.get_num_threads()}


def _batch(seed: int, stage: int, step: int, size: int) -> list[D.Sample]:
    """Stage ``stage``'s ``step``-th batch: disjoint index ranges of the training split per stage."""
    start = stage * 100_000_000 + step * size
    return list(D.generate(seed, size, start))


STAGES = ("vision", "language", "stage1", "stage2", "stage2b")


def train(out: str | Path, cfg: TrainConfig, stages: Sequence[str] = STAGES, resume: str | Path | None = None,
          lm_from: str | Path | None = None) -> dict:
    """Run ``stages`` (in recipe order) and save a llava-hf checkpoint directory at ``out``. Returns the log.

    ``resume``: start from a checkpoint this script wrote (e.g. one trained up to stage 2) instead of
    fresh weights, as LLaVA's own scripts run pre-training and fine-tuning as separate commands; the
    new ``training_info.json`` keeps the earlier stages' log and says where it resumed from.
    """
    if cfg.seed == D.HELDOUT_SEED:
        raise UsageError(f"seed {cfg.seed} is the held-out split's seed; pick another")
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage(s) {unknown or stages!r}; stages are {', '.join(STAGES)}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    deadline = None if cfg.minutes_budget is None else t_start + 60 * cfg.minutes_budget
    mc = cfg.model
    tok = build_tokenizer(cfg.seed, vocab_size=cfg.vocab_size)
    base_info: dict = {}
    if resume is not None:
        from transformers import LlavaForConditionalGeneration

        resume = Path(resume)
        if not (resume / "config.json").is_file():
            raise UsageError(f"--resume {resume}: not a checkpoint directory (no config.json)")
        from tokenizers import Tokenizer

        model = LlavaForConditionalGeneration.from_pretrained(resume)
        old_tok = Tokenizer.from_file(str(resume / "tokenizer.json"))
        if (resume / "training_info.json").is_file():
            base_info = json.loads((resume / "training_info.json").read_text())
        if old_tok.to_str() != tok.to_str():
            # a checkpoint of an earlier tokenizer (the word-level one): carry its rows over, then train on
            moved = transplant_vocabulary(model, old_tok, tok)
            base_info["transplanted"] = {"from_vocab": old_tok.get_vocab_size(), "to_vocab": tok.get_vocab_size(),
                                         "rows_carried": moved}
            print(f"vocabulary {old_tok.get_vocab_size()} -> {tok.get_vocab_size()} tokens, "
                  f"{moved} rows carried over", flush=True)
    else:
        model = build_model(mc, tok.get_vocab_size())
        if lm_from is not None:
            base_info["lm_from"] = copy_language_model(model, Path(lm_from), tok)
    model.train()
    log: dict = {k: v for k, v in base_info.get("log", {}).items() if isinstance(v, dict)}
    vt = model.model.vision_tower
    proj = model.model.multi_modal_projector
    lm = model.model.language_model
    n_img = mc.num_patches
    data_rng = np.random.default_rng([cfg.seed, 7])

    # Stage V: vision tower with auxiliary heads.
    heads = VisionHeads(mc.vision_hidden)

    # heads is bound here (default argument) rather than read from the enclosing scope, so that the
    # `del heads, vision_step` after the stage frees the auxiliary heads without leaving a closure
    # that reads a deleted name.
    def vision_step(step: int, heads: VisionHeads = heads) -> torch.Tensor:
        samples = _batch(cfg.seed, 0, step, cfg.vision.batch)
        lab = patch_labels(samples, mc.patch_size)
        o = vt(pixel_values=pixels(s.image for s in samples), output_hidden_states=True)
        feat = o.hidden_states[-2][:, 1:]  # what LLaVA reads
        loss = 0.0
        for k in ("color", "kind", "size", "cell", "digit"):
            logits = getattr(heads, k)(feat)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), lab[k].flatten(), ignore_index=-100)
        for k in ("nb_color", "nb_kind"):
            logits = getattr(heads, k)(feat).view(*lab[k].shape, -1)
            loss = loss + F.cross_entropy(logits.flatten(0, 2), lab[k].flatten(), ignore_index=-100)
        # Scene counts from the pooled CLS (trains the last layer) and from *every* patch: LLaVA drops
        # the CLS token, so the patch tokens themselves must carry scene-level statistics.
        n_p = feat.shape[1]
        # The inventory (which colour+kind pairs exist) is there so that "is there a green triangle?"
        # is one bit of any image token rather than a conjunction the small LM must compute.
        for f, cnt, cc, inv in ((o.pooler_output, lab["count"], lab["color_count"], lab["inventory"]),
                                (feat.flatten(0, 1), lab["count"].repeat_interleave(n_p),
                                 lab["color_count"].repeat_interleave(n_p, dim=0),
                                 lab["inventory"].repeat_interleave(n_p, dim=0))):
            loss = loss + F.cross_entropy(heads.count(f), cnt)
            loss = loss + F.cross_entropy(heads.color_count(f).view(-1, D.MAX_SHAPES + 1), cc.flatten())
            loss = loss + F.binary_cross_entropy_with_logits(heads.inventory(f), inv)
        return loss

    if "vision" in stages:
        _loop("vision", cfg.vision, [*vt.parameters(), *heads.parameters()], vision_step, deadline, log)
    del heads, vision_step
    vt.requires_grad_(False)
    vt.eval()

    # Stage L: language model on text only.
    eos = tok.token_to_id(EOS)

    def language_step(step: int) -> torch.Tensor:
        samples = _batch(cfg.seed, 1, step, cfg.language.batch)
        seqs = []
        for s in samples:
            if data_rng.random() < 0.3:
                ids = tok.encode(s.caption).ids + [eos]
            else:  # a transcript without the image, every token a label
                ids, _ = encode_conversation(tok, sample_turns(s, data_rng, 0.0, json_prob=cfg.json_prob), None)
            seqs.append((ids, ids))
        b = pad_batch(seqs)
        b["labels"][b["attention_mask"] == 0] = -100
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    lm_params = [*lm.parameters(), *model.lm_head.parameters()]
    if "language" in stages:
        _loop("language", cfg.language, lm_params, language_step, deadline, log)

    # Stage 1: projector only, captions.
    for p in lm_params:
        p.requires_grad_(False)

    def stage1_step(step: int) -> torch.Tensor:
        samples = _batch(cfg.seed, 2, step, cfg.stage1.batch)
        b = pad_batch([encode_conversation(tok, [(DESCRIBE, s.caption)], n_img) for s in samples])
        return model(pixel_values=pixels(s.image for s in samples), **b).loss

    if "stage1" in stages:
        _loop("stage1", cfg.stage1, list(proj.parameters()), stage1_step, deadline, log)

    # Stage 2: projector + LM, instruction conversations.
    for p in lm_params:
        p.requires_grad_(True)

    def conversation_step(data_stage: int, st: StageConfig, rng: np.random.Generator,
                          weights: dict[str, float] | None) -> Callable[[int], torch.Tensor]:
        """Stages 2 and 2b: instruction conversations, loss on answers; they differ in data and mix."""
        def step_fn(step: int) -> torch.Tensor:
            samples = _batch(cfg.seed, data_stage, step, st.batch)
            b = pad_batch([encode_conversation(tok, sample_turns(s, rng, cfg.describe_prob, weights, cfg.json_prob),
                                               n_img) for s in samples])
            return model(pixel_values=pixels(s.image for s in samples), **b).loss

        return step_fn

    if "stage2" in stages:
        _loop("stage2", cfg.stage2, [*proj.parameters(), *lm_params],
              conversation_step(3, cfg.stage2, data_rng, cfg.turn_weights), deadline, log)

    # Stage 2b: the same, focused on the question types stage 2 leaves at chance (FOCUS_WEIGHTS), with
    # its own data range and conversation stream.
    if "stage2b" in stages:
        _loop("stage2b", cfg.stage2b, [*proj.parameters(), *lm_params],
              conversation_step(5, cfg.stage2b, np.random.default_rng([cfg.seed, 99]), cfg.focus_weights),
              deadline, log)

    model.eval()
    log["total_seconds"] = round(time.time() - t_start + base_info.get("log", {}).get("total_seconds", 0.0), 1)
    log["budget_hit"] = any(v["steps_done"] < v["steps_planned"] for v in log.values() if isinstance(v, dict))
    save_checkpoint(out, model, tok, mc)
    info = {"config": asdict(cfg), "stages": list(stages), "log": log,
            "num_parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    if "lm_from" in base_info:
        info["lm_from"] = base_info["lm_from"]
    if resume is not None:
        info["resumed_from"] = {"path": str(resume), "stages": base_info.get("stages", list(STAGES[:4])),
                                "config": base_info.get("config"), "resumed_from": base_info.get("resumed_from"),
                                "transplanted": base_info.get("transplanted")}
    (Path(out) / "training_info.json").write_text(json.dumps(info, indent=2))
    return info


def copy_language_model(model, donor_dir: Path, tok) -> dict:
    """Start ``model``'s language model and head from a trained checkpoint's (same tokenizer, same LM
    dims); its vision tower and projector stay fresh. Why: a variant with another vision tower (a smaller
    patch, so more image tokens) needs only the vision stages and stage 2 retrained, not the LM's
    vocabulary and grammar again (stage L). Returns what was copied, for ``training_info.json``."""
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration

    if not (donor_dir / "config.json").is_file():
        raise UsageError(f"--lm-from {donor_dir}: not a checkpoint directory (no config.json)")
    donor_tok = Tokenizer.from_file(str(donor_dir / "tokenizer.json"))
    if donor_tok.get_vocab() != tok.get_vocab():
        raise UsageError(f"--lm-from {donor_dir}: its tokenizer is not this seed's (retrain it, or --resume it)")
    donor = LlavaForConditionalGeneration.from_pretrained(donor_dir)
    try:
        model.model.language_model.load_state_dict(donor.model.language_model.state_dict())
        model.lm_head.load_state_dict(donor.lm_head.state_dict())
    except RuntimeError as e:  # other LM dims
        first = str(e).splitlines()[0]
        raise UsageError(f"--lm-from {donor_dir}: its language model has other dims ({first})") from None
    return {"path": str(donor_dir), "copied": ["language_model", "lm_head"]}


def save_checkpoint(out: str | Path, model, tok, mc: ModelConfig) -> None:
    """Write the standard llava-hf layout: config, weights, tokenizer, image processor, processor."""
    from transformers import LlavaProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor(mc), tokenizer=hf_tokenizer(tok), patch_size=mc.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE,
    )
    processor.save_pretrained(out)
    # Also the per-part files older tools look for (transformers 5 folds them into
    # processor_config.json / tokenizer_config.json).
    processor.image_processor.save_pretrained(out)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # the 4.x name; 5.x maps it to TokenizersBackend
    tc_path.write_text(json.dumps(tc, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "image_token": IMAGE}, indent=2))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes-budget", type=float, default=None, help="safety cap on wall time")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's steps (tests: 0.01)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    ap.add_argument("--resume", default=None, help="start from this checkpoint (written by this script); one "
                    "with another tokenizer has its vocabulary transplanted (transplant_vocabulary)")
    ap.add_argument("--patch-size", type=int, default=None,
                    help=f"vision patch size (default {ModelConfig.patch_size}: 36 image tokens; 6: 144)")
    ap.add_argument("--text-hidden", type=int, default=None, help=f"language model width (default "
                    f"{ModelConfig.text_hidden}); a multiple of 256 (with --text-mlp) lets int4 blocks of 256 apply")
    ap.add_argument("--text-mlp", type=int, default=None,
                    help=f"language model MLP width (default {ModelConfig.text_mlp})")
    ap.add_argument("--lm-from", default=None, help="start the language model and head from this checkpoint "
                    "(same tokenizer); the vision tower and projector train fresh")
    ap.add_argument("--stage-steps", default="",
                    help="override step counts after scaling, e.g. stage2=1500,stage2b=800")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    cfg = config_from_args(a)
    info = train(a.out, cfg, stages=[s.strip() for s in a.stages.split(",") if s.strip()], resume=a.resume,
                 lm_from=a.lm_from)
    print(json.dumps(info["log"], indent=2))


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for, checked (one usage error per bad value)."""
    cfg = TrainConfig(seed=a.seed, threads=a.threads, minutes_budget=a.minutes_budget).scaled(a.steps_scale)
    if a.patch_size is not None:
        if a.patch_size < 1 or D.IMAGE_SIZE % a.patch_size:
            raise UsageError(f"--patch-size {a.patch_size}: must divide the image size {D.IMAGE_SIZE}")
        cfg.model.patch_size = a.patch_size
    for flag, value, field_name in (("--text-hidden", a.text_hidden, "text_hidden"),
                                    ("--text-mlp", a.text_mlp, "text_mlp")):
        if value is not None:
            if value < 128 or value % 128:  # GPTQ's group 128 (the class docstring) and whole heads
                raise UsageError(f"{flag} {value}: must be a positive multiple of 128")
            setattr(cfg.model, field_name, value)
    for item in filter(None, (x.strip() for x in a.stage_steps.split(","))):
        name, _, n = item.partition("=")
        if name not in STAGES or not n.isdigit() or int(n) < 1:
            raise UsageError(f"--stage-steps {item!r}: expected STAGE=N with STAGE one of {', '.join(STAGES)}")
        getattr(cfg, name).steps = int(n)
    return cfg


if __name__ == "__main__":
    main()

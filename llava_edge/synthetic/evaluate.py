"""Score any answerer on the held-out synthetic split: exact-match accuracy per question type.

An answerer is just ``answer_fn(image: PIL.Image, question: str) -> str``, so the same scoring applies
to the PyTorch checkpoint (``torch_answerer``), an exported fp32 package or a 4-bit one: numbers from
different backends are comparable because they see the same images, questions and references.

Each held-out sample contributes one single-turn question per applicable type (see ``data.questions``),
asked with the llava-1.5 prompt ``USER: <image>\\n{question} ASSISTANT:``.

Three no-vision baselines are reported per type, because "chance" is ambiguous:
``chance_uniform`` = 1/|answer space|; ``chance`` = the majority-answer rate on the evaluated held-out
questions; ``chance_blind`` = a text-only answerer that, for each exact question string, answers the
most common answer seen for it on the *training* split (the strongest cheat without looking).

    python -m llava_edge.synthetic.evaluate --checkpoint llava_edge/assets/tiny_llava --n 300
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from PIL import Image

from llava_edge.progress import progress_iter
from llava_edge.synthetic import data as D

AnswerFn = Callable[[Image.Image, str], str]

#: Seed of the scenes ``llava-edge demo`` shows (neither the training nor the held-out split).
DEMO_SEED = 2_000_029


def normalize(text: str) -> str:
    """Exact match up to case and surrounding/repeated whitespace."""
    return " ".join(text.strip().lower().split())


@functools.lru_cache(maxsize=4)
def _blind_table(train_seed: int, n: int) -> dict[str, str]:
    per_q: dict[str, Counter] = defaultdict(Counter)
    for i in range(n):  # the questions alone: no pictures to draw (half the time of generate)
        for t in D.generate_turns(train_seed, i):
            per_q[t.question][t.answer] += 1
    return {q: c.most_common(1)[0][0] for q, c in per_q.items()}


def blind_answerer(train_seed: int = D.TRAIN_SEED, n: int = 20_000) -> AnswerFn:
    """The text-only baseline: ignores the image, answers the training split's most common answer
    for this exact question (or "1" for a question never seen there)."""
    table = _blind_table(train_seed, n)
    return lambda image, question: table.get(question, "1")


def json_answer(text: str) -> str:
    """The ``answer`` field of a JSON answer (``{"answer": "red"}``), or "" when the text is not such an
    object: an answer that does not parse is wrong, not skipped."""
    try:
        obj = json.loads(text)
    except ValueError:
        return ""
    value = obj.get("answer") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else ""


def evaluate(answer_fn: AnswerFn, n: int = 300, seed: int = D.HELDOUT_SEED, start: int = 0,
             with_blind: bool = True, progress: bool = False,
             json_answers: bool = False) -> dict[str, dict[str, float]]:
    """Ask ``answer_fn`` every question of held-out samples ``start..start+n`` of split ``seed``.

    With ``json_answers`` each question is asked for a JSON answer (``data.as_json``) and scored on the
    parsed ``answer`` field (``json_answer``). Returns ``{question_type: {"accuracy", "chance",
    "chance_uniform", "chance_blind", "n"}}`` for every type that occurred (fractions in [0, 1]).
    """
    samples = list(D.generate(seed, n, start))
    blind = blind_answerer() if with_blind else None
    hits: Counter = Counter()
    blind_hits: Counter = Counter()
    total: Counter = Counter()
    for s in progress_iter(samples, f"eval: {n} scenes", enabled=progress):
        for t in s.turns:
            total[t.qtype] += 1
            if json_answers:
                got = json_answer(answer_fn(s.image, D.as_json(t).question))
            else:
                got = answer_fn(s.image, t.question)
            hits[t.qtype] += normalize(got) == normalize(t.answer)
            if blind is not None:
                blind_hits[t.qtype] += normalize(blind(s.image, t.question)) == normalize(t.answer)
    chance = D.chance_levels(samples)
    out: dict[str, dict[str, float]] = {}
    for qt in D.QUESTION_TYPES:
        if total[qt] == 0:
            continue
        out[qt] = {
            "accuracy": hits[qt] / total[qt],
            "chance": chance[qt]["majority"],
            "chance_uniform": chance[qt]["uniform"],
            "n": total[qt],
        }
        if blind is not None:
            out[qt]["chance_blind"] = blind_hits[qt] / total[qt]
    return out


def overall(results: dict[str, dict[str, float]]) -> float:
    """Question-weighted accuracy over all types."""
    n = sum(r["n"] for r in results.values())
    return sum(r["accuracy"] * r["n"] for r in results.values()) / n


def format_table(results: dict[str, dict[str, float]], title: str = "accuracy") -> str:
    """A markdown table (percent), the format docs/synthetic.md records."""
    lines = [f"| question type | n | {title} | chance (majority) | chance (uniform) | blind text-only |",
             "|---|---:|---:|---:|---:|---:|"]
    for qt, r in results.items():
        blind = f"{100 * r['chance_blind']:.1f}" if "chance_blind" in r else "-"
        lines.append(f"| {qt} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['chance']:.1f} | "
                     f"{100 * r['chance_uniform']:.1f} | {blind} |")
    lines.append(f"| **all** | {sum(r['n'] for r in results.values())} | {100 * overall(results):.1f} | | | |")
    return "\n".join(lines)


def torch_answerer(checkpoint_dir: str | Path, max_new_tokens: int = 8, threads: int | None = None) -> AnswerFn:
    """Greedy answers from a llava-hf checkpoint with transformers (the reference the exported
    packages are compared against). Imports torch lazily: the runtime never calls this."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from llava_edge.synthetic.train import user_prompt

    if threads is not None:
        torch.set_num_threads(threads)
    processor = LlavaProcessor.from_pretrained(str(checkpoint_dir))
    model = LlavaForConditionalGeneration.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
    tok = processor.tokenizer

    @torch.inference_mode()
    def answer(image: Image.Image, question: str) -> str:
        inputs = processor(images=image, text=user_prompt(question), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer


def package_answerer(package_dir: str | Path, backend: str = "ort", max_new_tokens: int = 8,
                     threads: int | None = None, prune: object = None) -> AnswerFn:
    """Greedy answers from an exported model package through the runtime (no torch). The prefix cache
    makes the later questions about one scene cheap, as on a kiosk. ``prune``: image tokens dropped before
    the decoder (runtime/prune.py, METHOD:RATIO)."""
    from llava_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_package(package_dir, backend=backend, threads=threads, prune=prune)

    def answer(image: Image.Image, question: str) -> str:
        return pipe.generate(image, question, max_new_tokens=max_new_tokens).text

    return answer


def demo_scenes(n: int = 3, seed: int = DEMO_SEED) -> list[tuple[Image.Image, list[str], list[str]]]:
    """A few scenes for ``llava-edge demo``: ``(image, questions, expected answers)``.

    Chosen deterministically from a seed of their own among busy scenes (3-4 shapes and a digit), so
    the printed answers exercise every kind of question and a person can check them on the picture.
    """
    out = []
    i = 0
    while len(out) < n:
        s = D.generate_sample(seed, i)
        i += 1
        if len(s.scene.shapes) < 3 or s.scene.digit is None:
            continue
        turns = sorted(s.turns, key=lambda t: D.QUESTION_TYPES.index(t.qtype))
        out.append((s.image, [t.question for t in turns], [t.answer for t in turns]))
    return out


def run_demo(answer_fn: AnswerFn, save_dir: str | Path | None = None, n: int = 3) -> tuple[int, int]:
    """Print each demo scene's questions with the model's and the true answers (and save the
    pictures, enlarged 4x, so a person can check). Returns (right, total)."""
    right = total = 0
    for k, (image, qs, refs) in enumerate(demo_scenes(n)):
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            path = Path(save_dir) / f"demo_{k}.png"
            image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)
            print(f"scene {k}: {path}")
        else:
            print(f"scene {k}:")
        for q, ref in zip(qs, refs):
            got = answer_fn(image, q)
            ok = normalize(got) == normalize(ref)
            right, total = right + ok, total + 1
            print(f"  {'ok ' if ok else 'XX '} {q:<50} -> {got:<12} (truth: {ref})")
    print(f"{right}/{total} right")
    return right, total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Exact-match accuracy per question type on the held-out split.")
    ap.add_argument("--checkpoint", required=True, help="llava-hf checkpoint directory")
    ap.add_argument("--n", type=int, default=300, help="held-out samples (each has 5-9 questions)")
    ap.add_argument("--seed", type=int, default=D.HELDOUT_SEED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--demo", default=None, metavar="DIR", help="instead: run the demo scenes, save pictures in DIR")
    ap.add_argument("--json-answers", action="store_true",
                    help="ask every question for a JSON answer and score its parsed 'answer' field")
    a = ap.parse_args(argv)
    t0 = time.time()
    fn = torch_answerer(a.checkpoint, threads=a.threads, max_new_tokens=16 if a.json_answers else 8)
    if a.demo:
        run_demo(fn, a.demo)
        return
    res = evaluate(fn, n=a.n, seed=a.seed, progress=True, json_answers=a.json_answers)
    print(format_table(res, "accuracy"))
    print(f"({time.time() - t0:.0f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

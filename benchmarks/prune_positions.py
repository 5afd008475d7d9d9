"""Pruned image tokens: renumbered positions against their original positions (the DART reference), scored on
the synthetic held-out set, outside the runtime.

This measurement decided the runtime's choice: it renumbered kept tokens then (consecutive positions), and
keeps them at their original positions since the fast decoder takes ``position_ids`` (docs/pruning.md,
"Positions"). The script answers every held-out question through the portable decoder, which takes explicit
``position_ids``, twice: with the positions renumbered, and with each kept token at its original position
(the text after the image where it was before pruning), written out here independently of the runtime's
``prune.prompt_positions``. The "original" score equals ``llava-edge eval --prune`` now (checked on both tiny
models, per question type); "renumbered" equals what ``eval`` gave before, and what a fast package exported
before the position input still gives.

    python3 benchmarks/prune_positions.py PACKAGE --n 300 --threads 1 -o benchmarks/results/prune_positions_tiny.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llava_edge.runtime.pipeline import Pipeline, Request
from llava_edge.runtime.preprocess import preprocess
from llava_edge.runtime.prune import PruneSetting, instruction_ids
from llava_edge.synthetic.evaluate import evaluate, overall


def answerer(pipe: Pipeline, prune: PruneSetting, original: bool, max_new_tokens: int = 8):
    m, be = pipe.manifest, pipe.backend
    image_id, eos = m.text.image_token_id, set(m.text.eos_token_ids)

    def answer(image, question: str) -> str:
        full = pipe.encode_request(Request([(question, None)], [image]), PruneSetting())
        ids = pipe.encode_request(Request([(question, None)], [image]), prune)
        feats = be.encode_images(preprocess(image, m.vision)[None])[0]
        embeds = be.embed(ids[None])
        instr = be.embed(instruction_ids(ids, image_id)[None])[0] if prune.needs_instruction else None
        keep = prune.select(feats, instr) if prune.active else np.arange(len(feats))
        slots = ids == image_id
        embeds[0, slots] = feats[keep]
        if original:  # text before the image, the kept tokens where they were, the text after where it was
            first = int(np.flatnonzero(full == image_id)[0])
            n_after = len(ids) - first - len(keep)
            pos = np.concatenate([np.arange(first), first + keep, first + len(feats) + np.arange(n_after)])
        else:
            pos = np.arange(len(ids))
        pos = pos[None].astype(np.int64)
        cache = be.new_cache(1, len(ids) + max_new_tokens)
        logits = be.step(cache, embeds, np.ones((1, len(ids)), np.int64), pos)
        out, nxt, length = [], int(pos[0, -1]) + 1, len(ids)
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[0]))
            out.append(tok)
            if tok in eos:
                break
            length += 1
            logits = be.step(cache, be.embed(np.array([[tok]])), np.ones((1, length), np.int64),
                             np.array([[nxt]], np.int64))
            nxt += 1
        return pipe.tokenizer.decode(out, skip_special_tokens=True).strip()

    return answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prune", action="append", default=None, help="METHOD:RATIO (repeatable)")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    pipe = Pipeline.from_package(a.package, backend="ort", threads=a.threads)
    rows = []
    for text in a.prune or ["dart:0.5", "dart:0.75", "cdpruner:0.5", "cdpruner:0.75"]:
        setting = PruneSetting.parse(text)
        row = {"prune": str(setting)}
        for name, original in (("renumbered", False), ("original", True)):
            res = evaluate(answerer(pipe, setting, original), n=a.n, with_blind=False)
            row[name] = round(100 * overall(res), 2)
            row[name + "_per_type"] = {k: round(100 * v["accuracy"], 1) for k, v in res.items()}
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("per_type")}), flush=True)
        rows.append(row)
    if a.output:
        a.output.write_text(json.dumps({"package": a.package.name, "n": a.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

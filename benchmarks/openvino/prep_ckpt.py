"""A llava-hf checkpoint saved by transformers 5.x, renamed so optimum-intel's transformers (< 5.6) loads it.

transformers 5 writes the CLIP tower as ``vision_tower.X``; transformers 4.x expects
``vision_tower.vision_model.X`` and, without a word, initialises every tower weight it does not find at
random. The export then "works" and the model sees noise. Everything but the weights is copied as is
(``preprocessor_config.json`` included: optimum does not write one, and the sitting copies it next to the IR).

usage: python prep_ckpt.py LLAVA_HF_CKPT OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.numpy import load_file, save_file

PREFIX = "vision_tower."


def renamed(key: str) -> str:
    if key.startswith(PREFIX) and not key.startswith(PREFIX + "vision_model."):
        return PREFIX + "vision_model." + key[len(PREFIX):]
    return key


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    out = {renamed(k): v for k, v in weights.items()}
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    print(f"{len(out)} tensors, {sum(renamed(k) != k for k in weights)} renamed")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

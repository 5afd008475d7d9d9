"""`llava-edge demo`: the whole path on a model that needs no download.

With the trained tiny LLaVA asset (llava_edge/assets/tiny_llava) the answers mean something; without
it the demo falls back to a random-weight checkpoint built on the spot, which shows the machinery
(export, verification, streaming, timings) but answers gibberish, and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

ASSET = Path(__file__).parent / "assets" / "tiny_llava"


def _scene(size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.ellipse((8, 30, 40, 62), fill=(220, 30, 30))
    d.rectangle((56, 30, 88, 62), fill=(30, 60, 220))
    return img


def _trained_scenes():
    try:
        from .synthetic.evaluate import demo_scenes
    except ImportError:
        return None
    return demo_scenes()


def run_demo(workdir: Path, max_new_tokens: int = 16, console: Console | None = None) -> None:
    from .export.exporter import export_package
    from .runtime.pipeline import Pipeline

    console = console or Console()
    workdir.mkdir(parents=True, exist_ok=True)
    trained = (ASSET / "config.json").is_file()
    t0 = time.perf_counter()
    if trained:
        checkpoint = ASSET
        console.print(f"[bold]1. checkpoint[/]: the trained tiny LLaVA shipped with llava-edge ({checkpoint})")
    else:
        from .export.factory import build_checkpoint

        checkpoint = workdir / "checkpoint"
        build_checkpoint(checkpoint, "llava-hf-v1.5")
        console.print(f"[bold]1. checkpoint[/]: random-weight tiny LLaVA-1.5 written to {checkpoint} "
                      "(no trained asset installed: answers will be gibberish)")
    package = workdir / "package"
    result = export_package(checkpoint, package, overwrite=True)
    errs = ", ".join(f"{k} {v:.1e}" for k, v in result.errors.items())
    console.print(f"[bold]2. export[/]: vision/embed/decoder ONNX in {package}; max |onnx - torch| {errs}")

    pipe = Pipeline.from_package(package)
    console.print(f"[bold]3. runtime[/]: onnxruntime, no torch; {pipe.manifest.vision.num_image_tokens} image "
                  f"tokens per image, template {pipe.template}")
    scenes = _trained_scenes() if trained else None
    if not scenes:
        scenes = [(_scene(), ["What is in the picture?", "What colour is the circle?"], [None, None])]
    right = total = 0
    for n, (image, questions, answers) in enumerate(scenes):
        path = workdir / f"scene{n}.png"
        image.save(path)
        console.print(f"\n[bold]image[/] {path}")
        for q, expected in zip(questions, answers):
            res = pipe.generate(image, q, max_new_tokens=max_new_tokens)
            mark = ""
            if expected is not None:
                ok = res.text.strip().lower() == str(expected).lower()
                right += ok
                total += 1
                mark = " [green]✓[/]" if ok else f" [red]✗ (expected {expected})[/]"
            console.print(f"  Q: {q}\n  A: {res.text!r}{mark}  [dim]({res.timings.prefill_ms:.0f} ms to first token, "
                          f"{res.timings.tokens_per_s:.0f} tok/s)[/]")
    if total:
        console.print(f"\n{right}/{total} answers match the scene generator's ground truth")
    console.print(f"\n[green]demo done[/] in {time.perf_counter() - t0:.1f} s")

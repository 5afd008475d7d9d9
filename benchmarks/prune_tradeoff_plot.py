"""docs/pruning_tradeoff.png: held-out accuracy against time to first token, per pruning method.

Two models, on purpose and said on the plot: accuracy needs trained weights, and the trained models here
(the tiny LLaVA with 144 image tokens, or the shipped one with 36) answer in a few ms, so their TTFT says nothing; speed
needs the edge-1b shape (random weights, int4 decoder; 196 image tokens with its ViT-B/16-224, 576 with a
ViT-L/14-336 as LLaVA-1.5), whose answers mean nothing. Each point pairs the same setting (method and ratio)
on both.

    python3 benchmarks/prune_tradeoff_plot.py                    # reads the JSONs in benchmarks/results
    python3 benchmarks/prune_tradeoff_plot.py --accuracy A.json --speed S.json -o docs/pruning_tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY = RESULTS / "prune_accuracy_tiny144.json"  # the trained model with 144 image tokens
SPEED = ("prune_speed_edge-1b_int4.json", "prune_speed_edge-1b-l14-336_int4.json")  # 196 and 576 image tokens
METHODS = {"dart": ("tab:blue", "o"), "cdpruner": ("tab:orange", "s")}
LINES = ("-", "--")


def points(accuracy: dict, speed: dict) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(ratio, TTFT relative to unpruned, held-out accuracy %)], the unpruned point first."""
    acc = {k: v["overall"] for k, v in accuracy["results"].items()}
    rel = {k: v["ttft_vs_first"] for k, v in speed["medians"].items()}
    out = {}
    for m in METHODS:
        pts = [(0.0, rel["off"], acc["off"])]
        for name in sorted(k for k in acc if k.startswith(m + ":")):
            if name in rel:
                pts.append((float(name.split(":")[1]), rel[name], acc[name]))
        out[m] = pts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accuracy", type=Path, default=ACCURACY,
                    help="accuracy JSON (default: the 144-token model's, prune_accuracy_tiny144.json)")
    ap.add_argument("--speed", type=Path, action="append", default=None,
                    help="prune_speed.py JSON (repeatable); default: those of " + ", ".join(SPEED) + " that exist")
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" /
                    "pruning_tradeoff.png")
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = json.loads(a.accuracy.read_text())
    speeds = [json.loads(f.read_text()) for f in (a.speed or [RESULTS / s for s in SPEED if (RESULTS / s).exists()])]
    fig, ax = plt.subplots(figsize=(8, 5.8))
    for speed, line in zip(speeds, LINES):
        n = speed["image_tokens"]
        for m, pts in points(accuracy, speed).items():
            color, marker = METHODS[m]
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=color, linestyle=line,
                    markerfacecolor=color if line == LINES[0] else "white", label=f"{m}, TTFT with {n} image tokens")
            for ratio, x, y in pts[1:]:
                ax.annotate(f"{ratio:.0%}", (x, y), textcoords="offset points", color=color, fontsize=8,
                            xytext=(5, -11 if m == "dart" else 5))
    ax.annotate("off", (1.0, accuracy["results"]["off"]["overall"]), textcoords="offset points", xytext=(-20, 5))
    ax.set_xlim(0.2, 1.05)
    for goal, label in ((0.6, "goal at 50%"), (0.4, "goal at 75%")):
        ax.axvline(goal, color="grey", linestyle=":", linewidth=1)
        ax.text(goal, 0.98, f" {label}", color="grey", fontsize=8, transform=ax.get_xaxis_transform(), va="top")
    threads = speeds[0]["threads"]
    ax.set_xlabel("time to first token with the image, relative to unpruned (median of per-round ratios)\n"
                  f"edge-1b shape, int4 decoder, random weights, {threads} threads, CPU")
    n_acc = accuracy["image_tokens"]
    ax.set_ylabel(f"held-out accuracy, % (trained tiny LLaVA, {n_acc} image tokens)")
    ax.set_title("Visual-token pruning: accuracy against TTFT, labels = share of image tokens removed.\n"
                 f"Two different models: accuracy from a trained tiny LLaVA ({n_acc} image tokens, too small\n"
                 "to time), TTFT from random-weight edge-1b-shaped packages (" +
                 " and ".join(str(s["image_tokens"]) for s in speeds) + " image tokens, answers meaningless)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()

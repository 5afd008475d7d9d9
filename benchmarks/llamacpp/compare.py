"""The side-by-side table of side_by_side.sh's OUT_DIR: llava-edge against llama.cpp, with ratios.

usage: python compare.py OUT_DIR [OUT_DIR ...] [--plot PNG]  (markdown on stdout; ratio = llava-edge / llama.cpp, so
> 1 is better for decode tok/s and < 1 is better for times, RSS and bytes)
"""
import json
import re
import sys
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}


def ours(out: Path, tag: str, kind: str) -> dict:
    d = load(out / f"ours-{tag}-{kind}.json")
    return d["results"][0] | {"package_bytes": d["package_bytes"]} if d else {}


def rss_mb(out: Path, tag: str) -> float | None:
    p = out / f"rss-{tag}.err"
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.read_text()) if p.is_file() else None
    return int(m.group(1)) / 1024 if m else None


def main(out: Path) -> None:
    lc = {q: load(out / f"llamacpp-{q}.json") for q in ("f32", "q4_0")}
    extra = sorted({p.name.split("-")[1] for p in out.glob("ours-int4?*-*.json")})  # side_by_side.sh's EXTRA
    me = {(t, k): ours(out, t, k) for t in ("int4", "fp32", *extra) for k in ("text", "image")}
    rows, pairs = [], []

    def row(label, a, b, fmt="{:.1f}"):
        ratio = f"{a / b:.2f}" if a and b else "-"
        rows.append(f"| {label} | {fmt.format(a) if a else '-'} | {fmt.format(b) if b else '-'} | {ratio} |")
        pairs.append((label.split(" (")[0], a, b))

    g = lambda d, *keys: (lambda v: v)(_get(d, keys))  # noqa: E731
    for tag, q in (("int4", "q4_0"), ("fp32", "f32")):
        row(f"{tag} decode, text prompt (tok/s)", g(me[tag, "text"], "decode_tokens_per_s"),
            g(lc[q], "text", "decode_tok_s"))
        row(f"{tag} decode, image prompt (tok/s)", g(me[tag, "image"], "decode_tokens_per_s"),
            g(lc[q], "image", "decode_tok_s"))
    for tag, q in (("int4", "q4_0"), ("fp32", "f32")):
        mine, theirs = me[tag, "image"], lc[q].get("image", {})
        a = mine.get("ttft_ms", 0) / 1e3
        row(f"TTFT with the image, {tag} (s; vision {mine.get('vision_ms', 0) / 1e3:.2f} vs "
            f"{theirs.get('image_encode_s', 0):.2f})", a, theirs.get("ttft_s"), "{:.2f}")
        row(f"TTFT text, {tag} (s)", me[tag, "text"].get("ttft_ms", 0) / 1e3, g(lc[q], "text", "ttft_s"), "{:.2f}")
    for tag in extra:  # more int4 packages, each against the same Q4_0 rows
        mine = me[tag, "image"]
        row(f"{tag} decode, text prompt (tok/s)", g(me[tag, "text"], "decode_tokens_per_s"),
            g(lc["q4_0"], "text", "decode_tok_s"))
        row(f"{tag} decode, image prompt (tok/s)", g(mine, "decode_tokens_per_s"),
            g(lc["q4_0"], "image", "decode_tok_s"))
        row(f"TTFT with the image, {tag} (s; vision {mine.get('vision_ms', 0) / 1e3:.2f})",
            mine.get("ttft_ms", 0) / 1e3, (lc["q4_0"].get("image") or {}).get("ttft_s"), "{:.2f}")
        row(f"peak RSS of one {tag} run (MB)", rss_mb(out, tag), lc["q4_0"].get("peak_rss_mb"), "{:.0f}")
    row("peak RSS of one int4 run (MB)", rss_mb(out, "int4"), lc["q4_0"].get("peak_rss_mb"), "{:.0f}")
    row("peak RSS of one fp32 run (MB)", rss_mb(out, "fp32"), lc["f32"].get("peak_rss_mb"), "{:.0f}")
    mmproj = 0
    for q in ("q4_0",):
        m = (lc[q].get("image") or {}).get("mmproj")
        mmproj = Path(m).stat().st_size if m and Path(m).is_file() else 0
    row("int4 deployment on disk (MB; llama.cpp: GGUF + mmproj)", me["int4", "text"].get("package_bytes", 0) / 2**20,
        (lc["q4_0"].get("gguf_mb") or 0) + mmproj / 2**20, "{:.0f}")
    print("| | llava-edge | llama.cpp | llava-edge / llama.cpp |\n|---|---|---|---|")
    print("\n".join(rows))
    when = (out / "when.txt").read_text().strip().replace("\n", "; ") if (out / "when.txt").is_file() else ""
    print(f"\n{when}")
    return pairs


def plot(pairs: list, path: Path) -> None:
    """One bar per row: llava-edge / llama.cpp, with the parity line (decode: higher is better; the rest: lower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(label, a / b) for label, a, b in pairs if a and b]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(pairs) + 1.2))
    colors = ["tab:green" if ("decode" in lb) == (r >= 1) else "tab:red" for lb, r in pairs]
    ax.barh([lb for lb, _ in pairs][::-1], [r for _, r in pairs][::-1], color=colors[::-1])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("llava-edge / llama.cpp (decode: > 1 is faster; times, RSS, bytes: < 1 is better)")
    for i, (label, r) in enumerate(pairs[::-1]):
        ax.text(r, i, f" {r:.2f}", va="center")
        goal = _goal(label)
        if goal:
            ax.plot([goal, goal], [i - 0.45, i + 0.45], color="black", lw=2.5, ls=":")
    ax.plot([], [], color="black", lw=2.5, ls=":", label="issue 18 goal")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _goal(label: str) -> float | None:
    """Issue 18's goal for a row, drawn on the plot: int4 decode >= 1.1x, time to first token with the image
    (int4) <= 0.5x, fp32 decode and memory >= / <= parity (the parity line)."""
    if label.startswith("int4") and "decode" in label:
        return 1.1
    if label.startswith("TTFT with the image, int4"):
        return 0.5
    return None


def _get(d: dict, keys: tuple) -> float | None:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def summary(sittings: list[list]) -> list:
    """Several sittings (OUT dirs): each row's ratio per sitting and the median, as (label, median a, median b)."""
    import statistics

    print(f"\n| | {' | '.join(f'sitting {i + 1}' for i in range(len(sittings)))} | median |")
    print("|---" * (len(sittings) + 2) + "|")
    out = []
    labels = list(dict.fromkeys(label for rows in sittings for label, _, _ in rows))  # rows by label, in order
    for label in labels:
        per = [next(((a, b) for lb, a, b in rows if lb == label), (None, None)) for rows in sittings]
        ratios = [a / b if a and b else None for a, b in per]
        if not any(ratios):
            continue
        med = statistics.median(r for r in ratios if r)
        print(f"| {label} | {' | '.join(f'{r:.2f}' if r else '-' for r in ratios)} | **{med:.2f}** |")
        out.append((label, med, 1.0))
    return out


if __name__ == "__main__":
    dirs = [Path(a) for a in sys.argv[1:] if not a.endswith(".png")]
    if "--plot" in sys.argv:
        dirs = [d for d in dirs if str(d) != "--plot"]
    results = [main(d) for d in dirs]
    result = summary(results) if len(results) > 1 else results[0]
    if "--plot" in sys.argv:
        plot(result, Path(sys.argv[sys.argv.index("--plot") + 1]))

"""Presenting a BenchmarkReport: a rich table on the terminal, a matplotlib PNG, a markdown summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the harness imports this module to print and plot
    from .harness import BenchmarkReport


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def rows(report: BenchmarkReport) -> list[dict[str, str]]:
    out = []
    for r in report.results:
        out.append({
            "engine": r.engine, "batch": str(r.batch), "prompt": str(r.prompt_tokens),
            "vision ms": _fmt(r.vision_ms), "TTFT ms": _fmt(r.ttft_ms),
            "tok p50 ms": _fmt(r.token_latency_ms["p50"], 2), "tok p90 ms": _fmt(r.token_latency_ms["p90"], 2),
            "tok p99 ms": _fmt(r.token_latency_ms["p99"], 2), "tok/s": _fmt(r.decode_tokens_per_s),
            "tok/s (batch)": _fmt(r.throughput_tokens_per_s),
            "overhead": "-" if r.overhead_fraction is None else f"{100 * r.overhead_fraction:.1f}%",
            "peak RSS MB": _fmt(r.peak_rss_bytes / 2**20, 0),
        })
    return out


def print_report(report: BenchmarkReport, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(160, Console().width))
    table = Table(title=f"llava-edge bench: {report.package_dir} ({report.package_bytes / 2**20:.0f} MB)")
    data = rows(report)
    for col in (data[0] if data else {}):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for row in data:
        table.add_row(*row.values())
    console.print(table)
    for r in report.ratios:
        console.print(f"{r['engine']} vs {r['vs']} (batch {r['batch']}, prompt {r['prompt_len']}): "
                      f"decode tokens/s x{r['decode_tokens_per_s_ratio']:.2f}, TTFT x{r['ttft_speedup']:.2f} faster")
    for k, same in report.outputs_identical.items():
        console.print(f"tokens identical {k}: {same}")
    la = report.machine.get("load_average")
    console.print(f"threads={report.config['threads']}, load average at start {la}, at end "
                  f"{report.machine.get('load_average_end')}")


def plot_report(report: BenchmarkReport, path: str | os.PathLike) -> Path:
    """Two panels: latency breakdown (vision / rest of first token / p50 token) and decode tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.engine}\nb{r.batch} p{r.prompt_tokens}" for r in report.results]
    vision = [r.vision_ms for r in report.results]
    prefill = [max(0.0, r.ttft_ms - r.vision_ms) for r in report.results]
    token = [r.token_latency_ms["p50"] for r in report.results]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(max(9, 2.2 * len(labels) + 4), 4.5))
    x = range(len(labels))
    ax1.bar(x, vision, label="vision encoder")
    ax1.bar(x, prefill, bottom=vision, label="prefill + first token")
    ax1.set_title("time to first token (ms)")
    ax1.legend(fontsize=7)
    ax2.bar(x, token, color="tab:green")
    ax2.set_title("per-token latency p50 (ms)")
    ax3.bar(x, [r.throughput_tokens_per_s for r in report.results], color="tab:purple")
    ax3.set_title("decode tokens/s (whole batch)")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    fig.suptitle(f"{Path(report.package_dir).name}, threads={report.config['threads']}, "
                 f"{report.config['new_tokens']} new tokens", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def markdown(report: BenchmarkReport, command: str = "") -> str:
    """A results note for benchmarks/results/: the table, ratios, identity checks, and the caveats."""
    data = rows(report)
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    if data:
        cols = list(data[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in data]
    lines.append("")
    for r in report.ratios:
        lines.append(f"- {r['engine']} vs transformers (batch {r['batch']}, prompt {r['prompt_len']}): decode "
                     f"tokens/s x{r['decode_tokens_per_s_ratio']:.2f}, TTFT x{r['ttft_speedup']:.2f}")
    for k, same in report.outputs_identical.items():
        lines.append(f"- tokens identical {k}: {same}")
    m = report.machine
    lines.append(f"- machine: {m.get('cpu')}, {m.get('cpu_count')} cores (shared), threads={m.get('threads')}, "
                 f"load average start {m.get('load_average')} end {m.get('load_average_end')}")
    lines.append(f"- versions: {report.versions}")
    return "\n".join(lines) + "\n"

"""The serving table: two `llava-edge bench-serve` JSON files (ours, the peer's) side by side, level by level.

usage: python compare_serve.py OURS.json PEER.json

Per client count: aggregate tok/s (all tokens over the level's wall time) of both and ours / peer (the issue's
goal: >= 1.2 at 4 and 8 clients), TTFT p50/p99 and per-token interval p50/p99 of both (goal: no worse); then the
arrival case (a request arriving while 3 streams decode) when both measured it. Markdown on stdout.
"""
import argparse
import json
from pathlib import Path


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ours", type=Path)
    ap.add_argument("peer", type=Path)
    args = ap.parse_args()
    ours, peer = (json.loads(p.read_text()) for p in (args.ours, args.peer))
    by_clients = {r["clients"]: r for r in peer["levels"]}
    c = ours["config"]
    print(f"{c['requests_per_client']} streaming requests per client per level, {c['max_tokens']} tokens each "
          f"(ignore_eos), one image each; threads={c['threads']}; llava-edge = {args.ours.stem}, "
          f"peer = {args.peer.stem}\n")
    print("| clients | tok/s llava-edge | tok/s peer | llava-edge / peer | TTFT p50 ms (ours / peer) | "
          "TTFT p99 ms | token p50 ms | token p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ours["levels"]:
        p = by_clients.get(r["clients"])
        if p is None:
            continue

        def pair(key: str, pct: str, r=r, p=p) -> str:
            return f"{r[key].get(pct)} / {p[key].get(pct)}"

        print(f"| {r['clients']} | {r['tok_per_s']} | {p['tok_per_s']} | {ratio(r['tok_per_s'], p['tok_per_s'])} | "
              f"{pair('ttft_ms', 'p50')} | {pair('ttft_ms', 'p99')} | {pair('token_ms', 'p50')} | "
              f"{pair('token_ms', 'p99')} | {r['errors']} / {p['errors']} |")
    a, b = ours.get("arrival"), peer.get("arrival")
    if a and b:
        print(f"\nArrival while 3 streams decode (ours / peer): TTFT {a['ttft_with_3_decoding_ms']} / "
              f"{b['ttft_with_3_decoding_ms']} ms (x{a['ttft_ratio']} / x{b['ttft_ratio']} of alone: "
              f"{a['ttft_alone_ms']} / {b['ttft_alone_ms']} ms); running streams' token p99 "
              f"{a['token_p99_during_arrival_ms']} / {b['token_p99_during_arrival_ms']} ms "
              f"(x{a['token_p99_ratio']} / x{b['token_p99_ratio']} of steady)")
    peak = [round(x) if x else x for x in (ours.get("server_peak_rss_mb"), peer.get("server_peak_rss_mb"))]
    load = [[round(x, 2) for x in r["machine"].get("load_average") or []] for r in (ours, peer)]
    print(f"\nServer peak RSS (ours / peer): {peak[0]} / {peak[1]} MB; machine: {ours['machine'].get('cpu')}, "
          f"load average at the end of each run {load[0]} / {load[1]}")


if __name__ == "__main__":
    main()

"""What the fast decoder's position input costs: the graph with ``position_ids`` (RotaryEmbedding on q and k,
GroupQueryAttention without rotary) against the graph before it (GroupQueryAttention's fused rotary), per step.

The same random small-100m decoder (benchmarks/arch.py: hidden 768, 8 layers, 12/4 heads, 32000 vocabulary),
both graphs built by ``export/fast_decoder.py`` (fp32, and int4-rtn as the cpu-int4 target ships), driven as
the runtime drives them (one in-place KV buffer per layer bound as past and present): a decode step (batch 1
and 4, 512 tokens cached) and a 256-token prefill chunk (after 256 cached: the engine's second chunk). The two
graphs alternate call by call, so load on the machine hits both alike; CPU time (user+sys of this process)
and wall time per call, median over the calls.

    python3 benchmarks/prune_positions_cost.py --threads 1 --rounds 30 -o benchmarks/results/prune_positions_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MAX_LEN = 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(root: Path, quant: str | None) -> dict[bool, Path]:
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_edge.benchmarks.arch import _llava_config, get_arch
    from llava_edge.export.fast_decoder import FastDecoderConfig, build_fast_decoder

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_llava_config(get_arch("small-100m"), 31999)).eval()
    out = {}
    for positions in (False, True):
        path = root / f"{quant or 'fp32'}_{positions}" / "decoder_fast.onnx"
        path.parent.mkdir(parents=True)
        build_fast_decoder(model, path, FastDecoderConfig(quant=quant, block_size=32, positions=positions))
        out[positions] = path
    return out


class Graph:
    """One fast decoder session and its in-place cache, bound as the runtime binds it."""

    def __init__(self, path: Path, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.positions = "position_ids" in ins
        past = [n for n in ins if n.startswith("past_key_values.")]
        _, kvh, _, d = ins[past[0]].shape
        self.hidden = ins["inputs_embeds"].shape[2]
        self.vocab = self.sess.get_outputs()[0].shape[1]
        self.past = past
        self.kv = {n: np.zeros((4, kvh, MAX_LEN, d), np.float32) for n in past}
        self.held = []
        self.bindings = {}

    def binding(self, b: int):
        if b not in self.bindings:
            io = self.sess.io_binding()
            for n in self.past:
                ov = ort.OrtValue.ortvalue_from_numpy(self.kv[n][:b])
                self.held.append(ov)
                io.bind_ortvalue_input(n, ov)
                io.bind_ortvalue_output(n.replace("past_key_values", "present"), ov)
            logits = np.zeros((b, self.vocab), np.float32)
            self.held.append(logits)
            io.bind_output("logits", "cpu", 0, np.float32, [b, self.vocab], logits.ctypes.data)
            self.bindings[b] = io
        return self.bindings[b]

    def run(self, b: int, s: int, past: int) -> None:
        io = self.binding(b)
        rng = np.random.default_rng(past + s)
        feeds = {"inputs_embeds": rng.standard_normal((b, s, self.hidden)).astype(np.float32),
                 "seqlens_k": np.full(b, past + s - 1, np.int32),
                 "total_sequence_length": np.array(past + s, np.int32),
                 "logits_index": np.arange(b, dtype=np.int64) * s + s - 1}
        if self.positions:  # a pruned prompt's positions run ahead of the cache (here by 100)
            feeds["position_ids"] = np.tile(np.arange(past, past + s, dtype=np.int64) + 100, (b, 1))
        keep = []
        for name, arr in feeds.items():
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(ov)
            io.bind_ortvalue_input(name, ov)
        self.sess.run_with_iobinding(io)


def measure(graphs: dict[bool, Graph], rounds: int) -> dict[str, dict]:
    steps = {"decode b1 (512 cached)": (1, 1, 512), "decode b4 (512 cached)": (4, 1, 512),
             "prefill 256 (256 cached)": (1, 256, 256)}
    out = {}
    for label, (b, s, past) in steps.items():
        for g in graphs.values():
            g.run(b, s, past)  # warm this shape
        cpu = {k: [] for k in graphs}
        wall = {k: [] for k in graphs}
        for r in range(rounds):
            order = list(graphs) if r % 2 == 0 else list(graphs)[::-1]
            for k in order:
                c0, w0 = cpu_seconds(), time.perf_counter()
                graphs[k].run(b, s, past)
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(cpu_seconds() - c0)
        row = {}
        for k, name in ((False, "before"), (True, "positions")):
            row[name] = {"cpu_ms": round(1000 * float(np.median(cpu[k])), 3),
                         "wall_ms": round(1000 * float(np.median(wall[k])), 3)}
        row["ratio_cpu"] = round(row["positions"]["cpu_ms"] / row["before"]["cpu_ms"], 4)
        row["ratio_wall"] = round(row["positions"]["wall_ms"] / row["before"]["wall_ms"], 4)
        # per-round paired ratios: the spread says what the medians can resolve
        paired = np.array(wall[True]) / np.array(wall[False])
        row["paired_wall_ratio_p25_p75"] = [round(float(np.percentile(paired, q)), 4) for q in (25, 75)]
        out[label] = row
        print(label, json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quant", action="append", default=None, help="fp32 and/or int4-rtn (default: both)")
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    result = {"model": "small-100m (random weights)", "threads": a.threads, "rounds": a.rounds,
              "onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(),
              "loadavg_before": os.getloadavg(), "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in a.quant or ["fp32", "int4-rtn"]:
            paths = build(Path(tmp), None if quant == "fp32" else quant)
            graphs = {k: Graph(p, a.threads) for k, p in paths.items()}
            print(f"-- {quant}", flush=True)
            result["graphs"][quant] = measure(graphs, a.rounds)
            del graphs
    result["loadavg_after"] = os.getloadavg()
    if a.output:
        a.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

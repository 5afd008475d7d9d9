"""Peak memory of GPTQ on a ~1B-class decoder built from a config (random weights, no download).

    python -m llava_edge.benchmarks.memory_bench [--layers 22] [--samples 4] [--seq 512] [--device cpu]

Builds a TinyLlama-shaped LlamaForCausalLM (hidden 2048, 22 layers, GQA 32/4, intermediate 5632,
vocab 32000) in float16 storage, captures layer-0 inputs for a few random-token samples and runs
the same layer-by-layer GPTQ as ``llava-edge quantize`` (act-order, int4, group 128). Reports the
resident set after building the model, the peak RSS during quantization (sampled every 20 ms and
from getrusage), the working set it adds and the time; with ``--device cuda`` also the peak GPU
memory, which is one layer plus activations and Hessians. Minutes on a CPU: not a default test.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakSampler:
    def __init__(self, interval: float = 0.02):
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def main(argv: list[str] | None = None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..quantize.capture import EncodedSample, capture_layer_inputs
    from ..quantize.gptq import GPTQConfig
    from ..quantize.sequential import QuantizeLayersConfig, quantize_layers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--holdout", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=str, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=a.layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.float16)  # build straight into fp16 storage: no fp32 copy of 1B params
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    rss_model = rss_mb()
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    samples = [EncodedSample(torch.randint(0, cfg.vocab_size, (1, a.seq), generator=g), None)
               for _ in range(a.samples + a.holdout)]
    if a.device != "cpu":
        model.model.embed_tokens.to(a.device)
        model.model.rotary_emb.to(a.device)
        model.model.norm.to(a.device)
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    with PeakSampler() as sampler:
        caps = capture_layer_inputs(model, samples, a.device, progress=True)
        res = quantize_layers(model, caps[: a.samples], caps[a.samples :], QuantizeLayersConfig(
            "gptq", GPTQConfig(bits=4, group_size=a.group_size, act_order=True), a.device, progress=True))
    quant_s = time.perf_counter() - t1
    out = {
        "config": {"hidden": 2048, "layers": a.layers, "heads": "32/4", "intermediate": 5632, "vocab": 32000,
                   "params": params, "storage": "float16", "samples": a.samples, "seq": a.seq,
                   "group_size": a.group_size, "device": a.device, "threads": torch.get_num_threads()},
        "rss_start_mb": round(rss0, 1),
        "rss_model_built_mb": round(rss_model, 1),
        "peak_rss_quantize_mb": round(sampler.peak, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "quantize_working_set_mb": round(sampler.peak - rss_model, 1),
        "build_s": round(build_s, 1),
        "quantize_s": round(quant_s, 1),
        "mean_gptq_over_rtn_layer_error": sum(e.ratio for e in res.layer_errors) / max(1, len(res.layer_errors)),
        "quantized_linears": len(res.quantized),
    }
    if a.device != "cpu":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

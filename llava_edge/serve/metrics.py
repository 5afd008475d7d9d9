"""Prometheus metrics (prometheus-client): request counts by status, latency histograms, engine state.

The engine's own counters (queue, running sequences, slots, cache hits) are read at scrape time by a
collector instead of being mirrored into metric objects on every step: the step stays free of metric
work and a scrape always sees the current state.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    def __init__(self, engine: Callable[[], Any]):
        self.engine = engine

    def collect(self):
        engine = self.engine()
        if engine is None:
            return
        sched = engine.scheduler
        for name, doc, value in (("queue_length", "Requests waiting for a KV slot", engine.queued),
                                 ("running_sequences", "Sequences prefilling or decoding", len(sched.running)),
                                 ("slots_in_use", "KV-cache slots in use", sched.slots_in_use),
                                 ("slots_total", "KV-cache slots", sched.max_slots)):
            yield GaugeMetricFamily(f"llava_edge_{name}", doc, value=value)
        ic = engine.image_cache
        yield CounterMetricFamily("llava_edge_image_cache_hits", "Images whose features came from the cache",
                                  value=ic.hits if ic else 0)
        yield CounterMetricFamily("llava_edge_image_cache_misses", "Images that went through the vision encoder",
                                  value=ic.misses if ic else 0)
        pc = engine.prefix_cache
        yield CounterMetricFamily("llava_edge_prefix_cache_hits", "Prompts that reused a cached prefix",
                                  value=pc.hits if pc else 0)
        yield CounterMetricFamily("llava_edge_engine_steps", "Engine steps run", value=engine.steps)
        yield CounterMetricFamily("llava_edge_engine_tokens", "Tokens the engine generated (cancelled ones included)",
                                  value=engine.tokens_generated)


class Metrics:
    def __init__(self, engine: Callable[[], Any]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llava_edge_requests", "Chat completion requests by HTTP status", ["status"],
                                registry=r)
        self.ttft = Histogram("llava_edge_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llava_edge_time_per_output_token_seconds", "Interval between streamed tokens",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llava_edge_prompt_tokens", "Prompt tokens (image tokens included)", registry=r)
        self.completion_tokens = Counter("llava_edge_completion_tokens", "Generated tokens", registry=r)
        self.cancelled = Counter("llava_edge_cancelled_requests", "Requests whose client went away", registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

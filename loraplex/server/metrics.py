"""Prometheus metrics for the server, on a per-app ``CollectorRegistry``.

Request metrics are labelled ``model``: the name the client asked for, i.e. the adapter's
name, or the served model name for the base model. Engine gauges (running / waiting
requests, free KV blocks, pinned adapter slots) and adapter load / eviction counters are
read from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)

# engine.stats() key -> (metric name, help, kind)
_ENGINE_STATS = {
    "num_running": ("loraplex_num_requests_running", "Requests in the running batch.", "gauge"),
    "num_waiting": ("loraplex_num_requests_waiting", "Requests queued for admission.", "gauge"),
    "num_free_blocks": ("loraplex_kv_free_blocks", "Free KV-cache blocks.", "gauge"),
    "num_total_blocks": ("loraplex_kv_total_blocks", "All KV-cache blocks.", "gauge"),
    "num_pinned_slots": ("loraplex_lora_pinned_slots",
                         "Adapter slots pinned by running requests.", "gauge"),
    "adapter_loads": ("loraplex_adapter_loads", "Adapter loads into device slots.", "counter"),
    "adapter_evictions": ("loraplex_adapter_evictions",
                          "Adapters evicted from device slots.", "counter"),
    "prefix_cache_queries": ("loraplex_prefix_cache_queries",
                             "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hits": ("loraplex_prefix_cache_hits",
                          "Prompt tokens served from the prefix cache.", "counter"),
    "prefix_cache_blocks": ("loraplex_prefix_cache_blocks",
                            "KV blocks held by the prefix cache.", "gauge"),
}
# engine.stats()["adapter_requests"]: {adapter ("" = base model): {"waiting": w, "running": r}}
_ADAPTER_REQUESTS = {"waiting": "loraplex_adapter_requests_waiting",
                     "running": "loraplex_adapter_requests_running"}


class _EngineStatsCollector(Collector):
    """Exports the last ``engine.stats()`` snapshot; unknown numeric keys become gauges."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        per_adapter = self.stats.get("adapter_requests") or {}
        for state, name in _ADAPTER_REQUESTS.items():
            family = GaugeMetricFamily(name, f"Requests {state}, per adapter ('' = base model).",
                                       labels=["adapter"])
            for adapter, counts in per_adapter.items():
                family.add_metric([adapter], counts[state])
            yield family
        for key, value in self.stats.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, doc, kind = _ENGINE_STATS.get(
                key, (f"loraplex_engine_{key}", f"engine.stats()['{key}']", "gauge"))
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=value)


class ServerMetrics:
    """All server metrics; ``render(stats)`` produces the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished engine requests (one per choice).",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.",
                                         ["model"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds",
                              "From arrival to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds",
                             "Between consecutive generated tokens of one request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds",
                             "From arrival to the last token.", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        self._engine.stats = dict(engine_stats)
        return generate_latest(self.registry)

    def tracker(self, model: str) -> RequestTracker:
        return RequestTracker(self, model)


class RequestTracker:
    """Timing and token counts of one engine request (one choice), fed its outputs."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._m = metrics
        self.model = model
        self.arrival = self._last = time.perf_counter()
        self.num_tokens = 0
        self.counted_prompt = False
        self.done = False

    def observe(self, delta: Any) -> None:
        """Record an ``OutputDelta`` (the tokens one step added) as it reaches the server."""
        if self.done:
            return
        now = time.perf_counter()
        if not self.counted_prompt:
            self._m.prompt_tokens.labels(self.model).inc(delta.num_prompt_tokens)
            self.counted_prompt = True
        new = len(delta.token_ids)
        if new > 0:
            if self.num_tokens == 0:
                self._m.ttft.observe(now - self.arrival)
                new_gaps = new - 1  # tokens after the first in this output
            else:
                new_gaps = new
            for _ in range(new_gaps):
                self._m.itl.observe((now - self._last) / new)
            self._m.generation_tokens.labels(self.model).inc(new)
            self.num_tokens += new
            self._last = now
        if delta.finished:
            self.finish(delta.finish_reason or "stop", now)

    def finish(self, reason: str, now: float | None = None) -> None:
        if self.done:
            return
        self.done = True
        now = time.perf_counter() if now is None else now
        self._m.requests.labels(self.model, reason).inc()
        if reason != "abort":
            self._m.e2e.observe(now - self.arrival)

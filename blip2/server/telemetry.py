"""What the server tells operators: Prometheus metrics (prometheus-client) and JSON access logs.

GET /metrics answers Prometheus text when asked (`?format=prometheus`, or an Accept header naming
text/plain or openmetrics, as Prometheus sends) and the JSON summary otherwise. Live state (queue depth,
batch sizes, cache, requests by status) is read from the batcher, engine and counters at scrape time;
latencies, time to first token and generated tokens are observed as requests finish. Under
`blip2 serve --workers N` those are summed over the workers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

access_log = logging.getLogger("blip2.access")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode, read when it is imported

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Routes keep their own label; anything else is "other", so a scanner cannot grow the label set.
ROUTES = {"/", "/healthz", "/metrics", "/v1/models", "/v1/caption", "/v1/answer", "/v1/chat/completions",
          "/v1/match", "/v1/embeddings", "/docs", "/openapi.json"}


def wants_prometheus(query: str, accept: str) -> bool:
    return "format=prometheus" in query or "text/plain" in accept or "openmetrics" in accept


class Telemetry:
    """The server's Prometheus registry (one per app, never the global one) and its access log."""

    def __init__(self, batcher, engine, counters) -> None:
        self.batcher, self.engine, self.counters = batcher, engine, counters
        try:
            import prometheus_client as prom
        except ModuleNotFoundError:
            self.registry = None  # JSON metrics and access logs still work
            return
        self.registry = prom.CollectorRegistry()
        self.latency = prom.Histogram("blip2_request_duration_seconds", "Time from request to response end",
                                      ["route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = prom.Histogram("blip2_time_to_first_token_seconds", "Time from submit to the first text "
                                   "the client receives (the whole answer when not streaming)",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = prom.Counter("blip2_generated_tokens", "Tokens generated (rate() gives tokens/s)",
                                   registry=self.registry)
        self.registry.register(_LiveState(self))

    # ---- observations
    def request_done(self, method: str, path: str, status: int, seconds: float, client: str) -> None:
        route = path if path in ROUTES else "other"
        if self.registry is not None:
            self.latency.labels(route, str(status or "none")).observe(seconds)
        access_log.info(json.dumps({"ts": round(time.time(), 3), "method": method, "path": route, "status": status,
                                    "ms": round(seconds * 1000, 2), "client": client}))

    def first_token(self, seconds: float) -> None:
        if self.registry is not None:
            self.ttft.observe(seconds)

    def generated(self, results) -> None:
        """Counts the tokens of a batch's GenerateResults (errors and other tasks count nothing)."""
        if self.registry is not None:
            self.tokens.inc(sum(getattr(r, "completion_tokens", 0) for r in results
                                if not isinstance(r, BaseException)))

    def prometheus_text(self) -> tuple[bytes, str]:
        import prometheus_client as prom

        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            # Several workers (`--workers N`): the histograms and counters of every worker, summed from
            # the files prometheus-client keeps in that folder; the live state is this worker's.
            from prometheus_client import multiprocess

            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(_LiveState(self))
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


class _LiveState:
    """A collector read at scrape time from the batcher's, cache's and guard's own counters."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        batch = self.t.batcher.snapshot()
        yield GaugeMetricFamily("blip2_queue_depth", "Requests waiting for a batch", value=batch["queued"])
        yield GaugeMetricFamily("blip2_batch_running", "Requests in the batch now running", value=batch["running"])
        yield GaugeMetricFamily("blip2_batch_capacity", "Most requests per batch", value=batch["max_batch"])
        yield _occupancy(self.t.batcher.stats.sizes, batch["max_batch"])
        if "kv_slots" in batch:  # continuous batching: the KV cache's rows (each one running request)
            yield GaugeMetricFamily("blip2_kv_slots", "Rows of the KV cache (most requests decoding at once)",
                                    value=batch["kv_slots"])
            yield GaugeMetricFamily("blip2_kv_slots_used", "KV cache rows holding a running request",
                                    value=batch["kv_slots_used"])
            yield GaugeMetricFamily("blip2_kv_cache_bytes", "Memory of the KV cache", value=batch["kv_cache_bytes"])
        yield CounterMetricFamily("blip2_rejected", "Requests refused with 503 (queue full)", value=batch["rejected"])
        yield CounterMetricFamily("blip2_timeouts", "Requests abandoned with 504", value=batch["timeouts"])
        yield CounterMetricFamily("blip2_busy_seconds", "Seconds the model thread ran batches",
                                  value=batch["busy_seconds"])
        cache = self.t.engine.cache.stats()
        for name in ("hits", "misses"):
            yield CounterMetricFamily(f"blip2_image_cache_{name}", f"Image-feature cache {name} (hit rate: "
                                      "hits / (hits + misses))", value=cache[name])
        yield GaugeMetricFamily("blip2_image_cache_entries", "Images whose features are cached", value=cache["entries"])
        by_status = CounterMetricFamily("blip2_responses", "Responses by HTTP status", labels=["status"])
        for status, count in sorted(self.t.counters.by_status.items()):
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily("blip2_requests_in_flight", "Requests being handled", value=self.t.counters.in_flight)


def _occupancy(sizes, capacity: int):
    """The batch sizes seen, as a histogram of occupancy (size / capacity) in tenths."""
    from prometheus_client.core import HistogramMetricFamily

    capacity = max(1, capacity)
    bounds = [round(b / 10, 1) for b in range(1, 11)]
    buckets = [(str(b), sum(n for size, n in sizes.items() if size / capacity <= b + 1e-9)) for b in bounds]
    total = sum(sizes.values())
    buckets.append(("+Inf", total))
    return HistogramMetricFamily("blip2_batch_occupancy", "Batch size over the batch capacity, per batch "
                                 "(continuous batching: per decode step)",
                                 buckets=buckets, sum_value=sum(size / capacity * n for size, n in sizes.items()))
